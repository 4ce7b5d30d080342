"""Causal-LM plumbing shared by E2E, commonsense and instruction following: SFT batches and batched decoding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(description: str, total: int, disable: bool = False) -> Progress:
    """A rich progress bar with ETA (every long loop outside the Trainer uses one)."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=disable, transient=False,
    )


def encode_sft_example(tokenizer, prompt: str, target: str, max_length: int, train_on_inputs: bool = False) -> dict[str, list[int]]:
    """``prompt + target + eos``, cut at ``max_length`` tokens.

    The loss covers the target tokens only (labels −100 on the prompt) unless ``train_on_inputs``, where every token
    is a label (LLM-Adapters' ``train_on_inputs=True``, which the KaSA authors' commonsense run uses).
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    if prompt_ids and tokenizer.sep_token_id is not None and prompt_ids[-1] == tokenizer.sep_token_id:
        prompt_ids = prompt_ids[:-1]  # WordPiece tokenizers append [SEP]; the prompt continues
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + target_ids)[:max_length]
    prompt_labels = list(prompt_ids) if train_on_inputs else [-100] * len(prompt_ids)
    labels = (prompt_labels + target_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def causal_lm_loss(label_smoothing: float):
    """A Trainer ``compute_loss_func``: next-token cross-entropy with label smoothing ε, mean over label tokens.

    Loss = (1 − ε)·NLL + ε·mean_k(−log p_k) per target token (``torch.nn.functional.cross_entropy``'s
    ``label_smoothing``, the same form as ``microsoft/LoRA``'s ``--label_smooth``), summed over tokens and divided by
    the number of label tokens in the (accumulated) batch. Written here rather than with the Trainer's own label
    smoother because that one shifts labels only for model classes it recognises, and a wrapped model
    (``KasaModel``) is not one of them.
    """

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        logits = logits[:, :-1, :].float()
        targets = labels[:, 1:].to(logits.device)
        total = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
            label_smoothing=label_smoothing, reduction="sum",
        )
        count = num_items_in_batch if num_items_in_batch else (targets != -100).sum().clamp_min(1)
        return total / count

    return loss


def decoding_options(config) -> dict:
    """The generation settings of a run config (beam width, length penalty, n-gram blocking, new-token cap)."""
    return {"num_beams": config.beams, "max_new_tokens": config.max_new_tokens,
            "length_penalty": config.length_penalty, "no_repeat_ngram_size": config.no_repeat_ngram_size}


@dataclass
class SFTCollator:
    pad_token_id: int

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), -100, dtype=torch.long)
        attention = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            attention[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 8,
    num_beams: int = 1,
    max_new_tokens: int = 32,
    description: str = "generating",
    show_progress: bool = True,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    temperature: float = 0.0,
) -> list[str]:
    """Greedy, beam-search or (``temperature`` > 0) sampled continuations of ``prompts``, decoded without the prompt.

    Batches are left-padded. ``length_penalty`` divides a beam's log-probability by length**penalty (Hugging Face's
    definition); ``no_repeat_ngram_size`` forbids repeating any n-gram of that size.
    """
    model.eval()
    device = next(model.parameters()).device
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        with progress_bar(description, len(prompts), disable=not show_progress) as progress:
            task = progress.add_task(description, total=len(prompts))
            for start in range(0, len(prompts), batch_size):
                batch = list(prompts[start : start + batch_size])
                encoded = tokenizer(batch, return_tensors="pt", padding=True)
                input_ids = encoded["input_ids"]
                attention = encoded["attention_mask"]
                sep = tokenizer.sep_token_id
                if sep is not None and bool((input_ids[:, -1] == sep).all()):
                    # WordPiece tokenizers close each prompt with [SEP]; drop it so generation continues the prompt.
                    input_ids, attention = input_ids[:, :-1], attention[:, :-1]
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    num_beams=num_beams,
                    length_penalty=length_penalty,
                    no_repeat_ngram_size=no_repeat_ngram_size or None,
                    do_sample=temperature > 0,
                    **({"temperature": temperature} if temperature > 0 else {}),
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new_tokens = generated[:, input_ids.shape[1] :]
                outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
                progress.advance(task, len(batch))
    finally:
        tokenizer.padding_side = previous_side
    return [text.strip() for text in outputs]
