models_path = "/nonexistent/models"  # tests point this at a temporary folder
