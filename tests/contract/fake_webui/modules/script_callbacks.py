from modules import calls

ui_tabs_callbacks: list = []
ui_settings_callbacks: list = []
model_loaded: list = []


def on_ui_tabs(callback, *, name=None):
    ui_tabs_callbacks.append(callback)


def on_ui_settings(callback, *, name=None):
    ui_settings_callbacks.append(callback)


def model_loaded_callback(sd_model):
    calls.append(("model_loaded_callback", sd_model))
    model_loaded.append(sd_model)
