# AUTOMATIC1111 / Forge / reForge entry point. The WebUI loads this file as a
# module of its own with the extension root on sys.path, so imports are absolute.
from manifold_webui.webui import register

register()
