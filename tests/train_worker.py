"""Runs `keras_twins.training.train` in a process of its own, for the tests.

    python train_worker.py SETTINGS.json

SETTINGS holds `train`'s keyword arguments plus `logical_cpus` (split the CPU
into that many devices before TensorFlow starts), `strategy` as a name or
`{"mirrored": [devices]}`, and `weights_out` (an .npz of the final weights).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = "-1"


def main(settings_path):
    with open(settings_path) as f:
        settings = json.load(f)
    import numpy as np
    import tensorflow as tf

    logical_cpus = settings.pop("logical_cpus", 1)
    if logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
    strategy = settings.pop("strategy", "auto")
    if strategy == "multi_worker":
        patient_coordination_service()
    if isinstance(strategy, dict):
        strategy = tf.distribute.MirroredStrategy(strategy["mirrored"])
    weights_out = settings.pop("weights_out")

    from keras_twins.training import train

    result = train(**settings, strategy=strategy, verbose=0)
    np.savez(weights_out, *result.model.get_weights())
    print(json.dumps({"replicas": result.model.distribute_strategy.num_replicas_in_sync,
                      "epochs": len(result.history["loss"]),
                      "loss": result.history["loss"]}))


def patient_coordination_service():
    """What MultiWorkerMirroredStrategy configures, with a 5-minute heartbeat
    timeout instead of TensorFlow's 10 s: on a loaded 2-core CI host a worker
    went unheard that long and the collectives aborted ("heartbeat timeout")."""
    from tensorflow.python.distribute import multi_worker_util
    # The protobuf module moves between TensorFlow versions; take the strategy's.
    from tensorflow.python.distribute.collective_all_reduce_strategy import (
        coordination_config_pb2)
    from tensorflow.python.distribute.cluster_resolver import TFConfigClusterResolver
    from tensorflow.python.eager import context

    cluster = TFConfigClusterResolver().cluster_spec()
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster),
        heartbeat_timeout_in_ms=300_000,
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(
            name=job, num_tasks=cluster.num_tasks(job))
            for job in ("chief", "worker") if job in cluster.jobs])


if __name__ == "__main__":
    main(sys.argv[1])
