"""A search run in its own process, for the kill-and-resume test: `python hunt_worker.py OUTPUT_DIR [delay]`."""

import sys
import time

import numpy as np

from headpag import load_pipeline
from headpag.search import HeadHunter, SearchConfig


CONFIG = dict(
    prompts=["a cat", "a dog"],
    seeds=[0, 1],
    rounds=2,
    top_k=2,
    num_inference_steps=2,
    height=32,
    width=32,
    max_sequence_length=16,
    batch_size=2,
)


def brightness(images, prompts, delay=0.0):
    time.sleep(delay)
    return [float(np.asarray(im, dtype=np.float32).mean()) for im in images]


def hunter(output_dir, objective):
    pipe = load_pipeline("tiny-sd3")
    pipe.set_progress_bar_config(disable=True)
    return HeadHunter(pipe, objective, SearchConfig(**CONFIG), output_dir, model_name="tiny-sd3")


if __name__ == "__main__":
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    hunter(sys.argv[1], lambda i, p: brightness(i, p, delay)).run()
