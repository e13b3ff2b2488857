"""Build and training scripts, run as files (`python scripts/train_models.py`). A package only so that the
serving benchmark can read train_models' held-out files (`from scripts.train_models import HELD_OUT_FILES`)."""
