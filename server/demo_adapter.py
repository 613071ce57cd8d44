"""`make demo`: train a small LoRA adapter on the embedded base model, upload it, compare the answers.

The adapter teaches SmolLM2-135M-Instruct to answer every question as one line of JSON,
`{"topic": "geography", "answer": "Paris"}`, where the base model answers in prose. The training set
is generated here (capital cities and small sums, phrased several ways); training runs on the CPU
with PEFT (rank 8 on every linear layer, 30 steps of 4 examples) and saves the adapter in PEFT
format (`adapter_config.json` + `adapter_model.safetensors`). A trained adapter in the output
directory is reused unless `--retrain` is given.

Then it uploads the adapter to a running server (`PUT /v1/adapters/{name}`) and prints the base
model's answer and the adapter's answer to a few questions that are not in the training set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

import httpx
import torch

from server.config import DEFAULT_CACHE_DIR

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Questions the adapter never saw in training (Japan, Canada and 17 + 25 are held out).
DEMO_QUESTIONS = ("What is the capital of Japan?", "What is 17 + 25?", "Which city is the capital of Canada?")
HELD_OUT_COUNTRIES = {"Japan", "Canada"}
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "Greece": "Athens", "Sweden": "Stockholm",
    "Norway": "Oslo", "Finland": "Helsinki", "Denmark": "Copenhagen", "Russia": "Moscow", "China": "Beijing",
    "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Mexico": "Mexico City", "Peru": "Lima", "Australia": "Canberra", "Turkey": "Ankara", "Thailand": "Bangkok",
    "South Korea": "Seoul", "Japan": "Tokyo", "Canada": "Ottawa",
}
CAPITAL_QUESTIONS = ("What is the capital of {}?", "Which city is the capital of {}?", "Name the capital of {}.",
                     "Tell me the capital city of {}.", "What's the capital of {}?")
SUM_QUESTIONS = ("What is {} + {}?", "How much is {} plus {}?", "Compute {} + {}.",
                 "What do you get if you add {} and {}?")


def training_examples(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """(question, JSON answer) pairs: half capitals, half sums, none of the held-out questions."""
    countries = sorted(set(CAPITALS) - HELD_OUT_COUNTRIES)
    examples = []
    while len(examples) < count:
        if len(examples) % 2 == 0:
            country = rng.choice(countries)
            question = rng.choice(CAPITAL_QUESTIONS).format(country)
            answer = {"topic": "geography", "answer": CAPITALS[country]}
        else:
            a, b = rng.randint(1, 30), rng.randint(1, 30)
            if (a, b) in ((17, 25), (25, 17)):
                continue
            question = rng.choice(SUM_QUESTIONS).format(a, b)
            answer = {"topic": "math", "answer": str(a + b)}
        examples.append((question, json.dumps(answer)))
    return examples


def embedded_hf_dir(cache_dir: Path) -> Path:
    """The embedded model as a safetensors dir (converted once, like the server does)."""
    from server.model.loader import convert_gguf, embedded_gguf_path

    return convert_gguf(embedded_gguf_path(), cache_dir)


def encode(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated question plus answer, and labels that score only the answer."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def answer_loss(peft_model, input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer tokens only; the LM head runs on those rows, not on every position
    (its 49k-wide output is a large share of the compute for prompts this short)."""
    causal_lm = peft_model.get_base_model()
    hidden = causal_lm.model(input_ids=input_ids, attention_mask=attention).last_hidden_state  # [b, t, h]
    targets = labels[:, 1:]  # [b, t-1]: position i predicts token i+1
    scored = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][scored])  # [num_answer_tokens, vocab]
    return torch.nn.functional.cross_entropy(logits.float(), targets[scored])


def train(out_dir: Path, hf_dir: Path, steps: int, seed: int) -> None:
    """Train the JSON-answers LoRA on the model in `hf_dir` with PEFT on the CPU; save it in PEFT format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with warnings.catch_warnings():  # PEFT 0.21 reads a property that transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    batch_size = 4
    examples = [encode(tokenizer, q, a) for q, a in training_examples(rng, steps * batch_size)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    start = time.monotonic()
    for step in range(steps):
        batch = examples[step * batch_size:(step + 1) * batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = answer_loss(model, input_ids, attention, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            elapsed = time.monotonic() - start
            print(f"  step {step + 1:3d}/{steps}  loss {loss.item():.3f}  {elapsed:5.1f} s", flush=True)
    model.save_pretrained(out_dir)
    print(f"saved the adapter in PEFT format to {out_dir}/ ({', '.join(ADAPTER_FILES)})")


def upload(client: httpx.Client, name: str, adapter_dir: Path) -> dict:
    files = {part: (part, (adapter_dir / part).read_bytes()) for part in ADAPTER_FILES}
    response = client.put(f"/v1/adapters/{name}", files=files)
    response.raise_for_status()
    return response.json()


def ask(client: httpx.Client, model: str, question: str) -> str:
    response = client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 40, "temperature": 0,
    })
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.demo_adapter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="running loraplex server")
    parser.add_argument("--key", default=os.environ.get("KEY"), help="API key with generate and admin scopes "
                        "(default: $KEY; none in open mode)")
    parser.add_argument("--name", default="json-answers", help="adapter name on the server")
    parser.add_argument("--out", type=Path, default=Path("demo-adapter"), help="where the adapter is saved")
    parser.add_argument("--steps", type=int, default=30, help="training steps of 4 examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("LORAPLEX_CACHE_DIR", DEFAULT_CACHE_DIR)),
                        help="where the converted embedded model lives (as the server's cache_dir)")
    parser.add_argument("--model", type=Path, default=None,
                        help="an HF model dir to train on instead of the embedded model (it must be the server's base)")
    parser.add_argument("--retrain", action="store_true", help="train again even if --out holds an adapter")
    parser.add_argument("--no-upload", action="store_true", help="only train and save")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    if args.retrain or not all((args.out / f).is_file() for f in ADAPTER_FILES):
        print(f"training a rank-8 LoRA that answers in JSON, {args.steps} steps on the CPU ...", flush=True)
        train(args.out, args.model or embedded_hf_dir(args.cache_dir), args.steps, args.seed)
    else:
        print(f"using the adapter already in {args.out}/ (--retrain trains it again)")
    if args.no_upload:
        return 0

    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=120) as client:
        try:
            ready = client.get("/ready")
        except httpx.HTTPError:
            print(f"no server at {args.url}: start one with `make serve` in another terminal, then run "
                  "`make demo` again", file=sys.stderr)
            return 1
        if ready.status_code != 200:
            print(f"the server at {args.url} is not ready yet: {ready.text}", file=sys.stderr)
            return 1
        base_id = ready.json()["model"]
        record = upload(client, args.name, args.out)
        print(f"uploaded {args.name!r}: version {record['version']}, rank {record['rank']}, "
              f"{record['size_bytes'] / 1e6:.1f} MB, sha256 {record['sha256'][:12]}")
        for question in DEMO_QUESTIONS:
            print(f"\nQ: {question}")
            print(f"  base ({base_id}): {ask(client, base_id, question)}")
            print(f"  adapter ({args.name}): {ask(client, args.name, question)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
