import os
import sys

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py, also in spawned DDP processes
