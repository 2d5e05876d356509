"""A small synthetic world for the continual benchmark and the shipped sample: four visual
question-answering tasks that a tiny LLaVA can learn in seconds on a CPU, each with its own
kind of picture (so a projector-input prototype can recognise it) and its own answer words
(so tasks conflict in the language model), and a broad "generalist" mixture to pretrain a base.

Every image and record is a pure function of (task, split, index, seed): nothing is downloaded
and a rerun writes the same files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

IMAGE_SIZE = 32
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"grey": (128, 128, 128), "black": (0, 0, 0), "blue": (20, 30, 110), "white": (255, 255, 255)}
SHAPES = ("circle", "square", "triangle", "cross")
COUNTS = ("one", "two", "three", "four", "five")
PLACES = ("left", "right", "top", "bottom")


@dataclass(frozen=True)
class Example:
    image: Image.Image
    prompt: str
    answer: str


@dataclass(frozen=True)
class WorldTask:
    name: str
    prompt: str
    background: str
    answers: tuple[str, ...]
    draw: Callable[[ImageDraw.ImageDraw, random.Random, str], None]

    def example(self, rng: random.Random) -> Example:
        answer = rng.choice(self.answers)
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[self.background])
        self.draw(ImageDraw.Draw(image), rng, answer)
        return Example(image, self.prompt, answer)


def _shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)
    else:
        third_x, third_y = (right - left) // 3, (bottom - top) // 3
        draw.rectangle((left + third_x, top, right - third_x, bottom), fill=fill)
        draw.rectangle((left, top + third_y, right, bottom - third_y), fill=fill)


def _random_box(rng: random.Random, low: int, high: int) -> tuple[int, int, int, int]:
    size = rng.randint(low, high)
    left, top = rng.randint(1, IMAGE_SIZE - size - 2), rng.randint(1, IMAGE_SIZE - size - 2)
    return left, top, left + size, top + size


def _draw_colour(draw, rng, answer):
    _shape(draw, rng.choice(SHAPES), _random_box(rng, 10, 18), COLOURS[answer])


def _draw_count(draw, rng, answer):
    cells = rng.sample([(x, y) for x in range(4) for y in range(4)], COUNTS.index(answer) + 1)
    for x, y in cells:  # one dot per cell of a 4×4 grid, jittered, so dots never touch
        cx, cy = 4 + 8 * x + rng.randint(-1, 1), 4 + 8 * y + rng.randint(-1, 1)
        draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=(255, 255, 255))


def _draw_shape(draw, rng, answer):
    _shape(draw, answer, _random_box(rng, 14, 22), (240, 240, 240))


def _draw_place(draw, rng, answer):
    size = rng.randint(6, 9)
    along = rng.randint(10, IMAGE_SIZE - 10 - size)
    edge = rng.randint(1, 4)
    left, top = {
        "left": (edge, along),
        "right": (IMAGE_SIZE - edge - size, along),
        "top": (along, edge),
        "bottom": (along, IMAGE_SIZE - edge - size),
    }[answer]
    draw.rectangle((left, top, left + size, top + size), fill=(10, 10, 10))


TASKS = (
    WorldTask("1_colour", "what colour is the shape ?", "grey", tuple(COLOURS), _draw_colour),
    WorldTask("2_count", "how many dots are there ?", "black", COUNTS, _draw_count),
    WorldTask("3_shape", "what shape is it ?", "blue", SHAPES, _draw_shape),
    WorldTask("4_place", "where is the square ?", "white", PLACES, _draw_place),
)
ANSWER_WORDS = tuple(sorted({word for task in TASKS for word in task.answers} | set(BACKGROUNDS)))


def generalist_example(rng: random.Random) -> Example:
    """The base's broad mixture: it sees every kind of picture and says every answer word, but
    is never asked what the tasks ask (the background's colour; repeating a word)."""
    task = rng.choice(TASKS)
    image = task.example(rng).image
    if rng.random() < 0.5:
        return Example(image, "what colour is the background ?", task.background)
    word = rng.choice(ANSWER_WORDS)
    return Example(image, f"say the word {word} .", word)


def task_rng(task: str, split: str, seed: int) -> random.Random:
    return random.Random(f"{task}/{split}/{seed}")


def examples(task: WorldTask, split: str, count: int, seed: int) -> list[Example]:
    rng = task_rng(task.name, split, seed)
    return [task.example(rng) for _ in range(count)]


def write_split(folder: Path, task: WorldTask, split: str, count: int, seed: int) -> Path:
    """`folder/<split>.jsonl` and its PNG images under `folder/<split>/`."""
    (folder / split).mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.jsonl"
    with open(path, "w") as handle:
        for index, example in enumerate(examples(task, split, count, seed)):
            image = f"{split}/{index:03d}.png"
            example.image.save(folder / image, optimize=True)
            handle.write(
                json.dumps({"image": image, "prompt": example.prompt, "answer": example.answer, "task": task.name})
                + "\n"
            )
    return path
