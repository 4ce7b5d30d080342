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


def encode_sft_example(tokenizer, prompt: str, target: str, max_length: int) -> dict[str, list[int]]:
    """``prompt + target + eos`` with the loss on the target tokens only (labels −100 on the prompt)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    if prompt_ids and tokenizer.sep_token_id is not None and prompt_ids[-1] == tokenizer.sep_token_id:
        prompt_ids = prompt_ids[:-1]  # WordPiece tokenizers append [SEP]; the prompt continues
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + target_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + target_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


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
) -> list[str]:
    """Greedy or beam-search continuations of ``prompts`` (left-padded batches), decoded without the prompt."""
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
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new_tokens = generated[:, input_ids.shape[1] :]
                outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
                progress.advance(task, len(batch))
    finally:
        tokenizer.padding_side = previous_side
    return [text.strip() for text in outputs]
