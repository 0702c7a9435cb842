"""lm-evaluation-harness against the served test app, offline, on the local tasks in
tests/lm_eval_tasks (a multiple-choice task and a generation task, a handful of docs each).

Offline settings: the tokenizer is the served model's own folder (`tokenizer_backend:
huggingface`, `tokenized_requests: true`: lm-eval sends token ids, so its loglikelihoods are of
exactly the tokens it chose), the data are local JSON Lines read by `datasets`' json builder,
and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE forbid any download.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.serve_fixtures import SERVED_MODEL

TASKS = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture
def evaluate(served, tiny_model_dir, tmp_path, monkeypatch):
    """Run lm-eval's `simple_evaluate` on the served app through `model` ("local-completions"
    or "local-chat-completions"); returns its results, with the samples."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.chdir(TASKS)  # the task files name their data relative to their folder
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    def run(model: str, tasks: list[str]) -> dict:
        route = "chat/completions" if model == "local-chat-completions" else "completions"
        model_args = {
            "model": SERVED_MODEL, "base_url": f"{served}/v1/{route}", "tokenizer": str(tiny_model_dir),
            "tokenizer_backend": "huggingface", "tokenized_requests": model == "local-completions",
            "num_concurrent": 2, "max_retries": 1, "max_length": 1024,
        }
        return simple_evaluate(
            model=model, model_args=model_args, tasks=tasks, task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
            apply_chat_template=model == "local-chat-completions", log_samples=True,
        )

    return run


def test_multiple_choice_and_generation_through_local_completions(evaluate, tiny_model_dir):
    results = evaluate("local-completions", ["tiny_mc", "tiny_gen"])
    assert set(results["results"]) == {"tiny_mc", "tiny_gen"}
    assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in results["results"]["tiny_gen"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    samples = results["samples"]["tiny_mc"]
    assert len(samples) == 4
    for sample in samples:  # every choice's loglikelihood is HF's own, summed over its tokens
        for (context, continuation), [(loglikelihood, _greedy)] in zip(sample["arguments"], sample["resps"]):
            assert loglikelihood == pytest.approx(hf_loglikelihood(model, tokenizer, context, continuation), abs=1e-3)
    assert all(sample["resps"][0][0] for sample in results["samples"]["tiny_gen"])  # something was generated


def test_generation_through_local_chat_completions(evaluate):
    results = evaluate("local-chat-completions", ["tiny_gen"])
    assert "exact_match,none" in results["results"]["tiny_gen"]
    assert len(results["samples"]["tiny_gen"]) == 3


def hf_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context) as lm-eval splits them: the continuation's tokens are those
    of the whole text after the context's tokens."""
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logprobs[p - 1, whole[p]].item() for p in range(start, len(whole)))
