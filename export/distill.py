"""Teach a random-weight Hugging Face chat VLM folder to answer questions about photos, with the
bundled captioner as its teacher (`python -m export distill DIR --photos FOLDER`).

No trained LLM-based VLM exists offline, and a random-weight one cannot judge 4- and 8-bit weights:
its next-token logits are nearly flat, so any noise overturns them, and it writes the same tokens
for every photo (README, "The weight-only gate"). Trained here on a narrow task, the same
architecture gets what a gate needs: peaked logits and answers that depend on the photo. The
teacher's answers, per crop of each photo:
- the family's default question ("Can you describe this image?"): the bundled model's caption;
- "How many objects are in this image?": how many ImageNet classes that caption names, in words;
- "What colours do you see?": the two named colours that cover most of the crop's pixels.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from runtime import DEFAULT_MODEL, Captioner

from .check import ExportError
from .concepts import named_classes
from .evaluation import QUESTIONS, random_crop
from .hf import family_of, load_model

COLOURS = {"black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128), "red": (200, 30, 30),
           "orange": (240, 140, 20), "yellow": (240, 220, 40), "green": (40, 150, 50), "blue": (40, 80, 200),
           "purple": (130, 50, 150), "pink": (240, 150, 180), "brown": (120, 80, 40)}
NUMBERS = ("no", "one", "two", "three", "four", "five")
EVALUATED = 240  # training answers the summary's teacher-forced top-1 is measured on (the first 80 images')


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 1500
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 50
    crops: int = 4  # per photo, besides the whole photo
    seed: int = 0
    threads: int = 2


def colours(image: Image.Image) -> str:
    """The two named colours nearest to most of the image's pixels."""
    pixels = np.asarray(image.convert("RGB").resize((64, 64)), np.float32).reshape(-1, 3)
    palette = np.array(list(COLOURS.values()), np.float32)
    nearest = ((pixels[:, None] - palette[None]) ** 2).sum(-1).argmin(1)
    top = np.argsort(-np.bincount(nearest, minlength=len(palette)), kind="stable")[:2]
    names = list(COLOURS)
    return f"{names[top[0]]} and {names[top[1]]}"


def teacher_answers(images: list[Image.Image], default_question: str) -> list[tuple[Image.Image, str, str]]:
    """(image, question, answer) for each image and question, from the bundled captioner."""
    captions = [c.text for c in Captioner(DEFAULT_MODEL).caption(images)]
    examples = []
    for image, caption in zip(images, captions):
        count = len(set(named_classes(caption)))
        examples += [(image, default_question, caption[0].upper() + caption[1:] + "."),
                     (image, QUESTIONS[0], f"I see {NUMBERS[min(count, 5)]} object{'s' if count != 1 else ''}."),
                     (image, QUESTIONS[1], f"I see {colours(image)}.")]
    return examples


def batch_tensors(processor, examples, end: str) -> dict:
    """The processor's inputs for prompt + answer + end (right-padded), labels on the answer and its
    end only: the last tokens of each row, as many as the answer alone tokenizes to (a byte-level BPE
    splits before the answer's leading space, so the prompt's tokens are the same)."""
    texts, images, answers = [], [], []
    for image, question, answer in examples:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True) + f" {answer}{end}")
        images.append([image])
        answers.append(len(processor.tokenizer(f" {answer}{end}", add_special_tokens=False)["input_ids"]))
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], -100)
    for row, n in enumerate(answers):
        length = int(inputs["attention_mask"][row].sum())
        labels[row, length - n : length] = inputs["input_ids"][row, length - n : length]
    return {**inputs, "labels": labels}


def answer_end(processor, model) -> str:
    """The token that ends an answer: the model's (first) end-of-sequence id, as text."""
    eos = model.generation_config.eos_token_id
    return processor.tokenizer.convert_ids_to_tokens(eos[0] if isinstance(eos, list) else eos)


def teacher_forced_top1(model, processor, examples, batch_size: int = 8) -> float:
    """Fraction of answer positions where the model's most likely next token is the teacher's."""
    end, hits, total = answer_end(processor, model), 0, 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = batch_tensors(processor, examples[start : start + batch_size], end)
            labels = batch.pop("labels")[:, 1:]
            picked = model(**batch).logits[:, :-1].argmax(-1)
            hits += int(((picked == labels) & (labels != -100)).sum())
            total += int((labels != -100).sum())
    return hits / total


def distill(folder: Path, photos: list[Path], cfg: DistillConfig = DistillConfig(), progress=None) -> dict:
    """Fine-tune `folder`'s weights in place on the teacher's answers about `photos` and `cfg.crops`
    seeded crops of each; returns the training summary."""
    from transformers import AutoProcessor

    if not photos:
        raise ExportError("no photos to distill on")
    family = family_of(folder)
    if not hasattr(family, "DEFAULT_QUESTION"):
        raise ExportError(f"{folder}: distill teaches the chat families only (SmolVLM, FastVLM, Qwen2.5-VL)")
    torch.manual_seed(cfg.seed)
    threads = torch.get_num_threads()
    rng = np.random.default_rng(cfg.seed)
    images = []
    for path in photos:
        photo = Image.open(path).convert("RGB")
        images += [photo] + [random_crop(photo, rng) for _ in range(cfg.crops)]
    examples = teacher_answers(images, family.DEFAULT_QUESTION)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    processor.tokenizer.padding_side = "right"  # batch_tensors finds each answer at its row's end
    _, model = load_model(folder)
    end = answer_end(processor, model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    loss_avg = None
    try:
        torch.set_num_threads(cfg.threads)  # fixed: CPU float reductions depend on the thread count
        model.train()
        for step in range(cfg.steps):
            for group in opt.param_groups:  # linear warmup, cosine decay
                group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
            chosen = rng.choice(len(examples), min(cfg.batch_size, len(examples)), replace=False)
            loss = model(**batch_tensors(processor, [examples[i] for i in chosen], end)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
            if progress:
                progress.update(step + 1, f"loss {loss_avg:.4f}")
        model.eval()
        top1 = teacher_forced_top1(model, processor, examples[:EVALUATED])
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(folder)
    return {"steps": cfg.steps, "photos": len(photos), "answers": len(examples), "final_loss": round(loss_avg, 4),
            "teacher_forced_top1": round(top1, 4), "evaluated": min(EVALUATED, len(examples))}
