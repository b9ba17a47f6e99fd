import keras

# Registering every layer under one package name lets `keras.models.load_model`
# rebuild saved models without `custom_objects`, once keras_twins is imported.
register = keras.saving.register_keras_serializable(package="keras_twins")
