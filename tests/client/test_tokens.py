"""SFT records: the loss is over response tokens only; truncation keeps the label; chat templates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord

from client.data import load_records
from client.tokens import (
    CONTEXT,
    PAD,
    TARGET,
    Example,
    conversation_segments,
    example_of,
    render,
    tokenize_examples,
)
from client.train import DPPlan, DPStepper, evaluate_loss, per_sample_loss
from common.errors import DataError
from common.modeling import load_tokenizer
from tests.client.hostile import Site, reason, status
from tests.client.lora import lora_model

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = [
    Example("Summarize the note: chest pain at rest, troponin normal.", "Chest pain, troponin normal."),
    Example("List the medications.", "Aspirin 81 mg daily; metoprolol 25 mg.", system="Be brief."),
    Example("", "Progress note: the patient walked twice today and slept well."),  # raw text
]
# a ChatML-style template, as Qwen-family tokenizers ship
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Any:
    return lora_model(tiny_model)


def _by_hand(model: Any, tokenizer: Any, ex: Example) -> float:
    """The mean cross-entropy of predicting the response tokens (+ EOS) after the prompt, alone."""
    p_ids = tokenizer(ex.plain_prompt)["input_ids"]
    t_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([p_ids + t_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    losses = [
        torch.nn.functional.cross_entropy(logits[i - 1 : i], ids[0, i : i + 1])
        for i in range(len(p_ids), len(p_ids) + len(t_ids))
    ]
    return float(torch.stack(losses).mean())


def test_the_loss_is_the_mean_over_response_tokens_only(model: Any, tokenizer: Any) -> None:
    tok = tokenize_examples(EXAMPLES, tokenizer, 96)
    assert tok.too_long == () and tok.ids.size(0) == 3
    model.eval()
    with torch.no_grad():
        got = per_sample_loss(model, tok.ids, tok.roles)
        every_token = per_sample_loss(model, tok.ids, (tok.roles != PAD).long())
    for i, ex in enumerate(EXAMPLES):
        assert float(got[i]) == pytest.approx(_by_hand(model, tokenizer, ex), rel=1e-5)
    assert float(got[0]) != pytest.approx(float(every_token[0]), rel=1e-3)  # the prompt is not learned
    assert float(got[2]) == pytest.approx(float(every_token[2]), rel=1e-6)  # raw text: every token
    # the training loss is that same mean, and evaluation weighs records by their response tokens
    stepper = DPStepper(
        model.train(), DPPlan(0.0, 1.0, 1, 1.0, 3), learning_rate=0.0, noise_generator=torch.Generator()
    )
    try:
        assert stepper.backward(tok.ids, tok.roles) == pytest.approx(float(got.mean()), rel=1e-5)
    finally:
        stepper.close()
    counts = (tok.roles[:, 1:] == TARGET).sum(dim=1).float()
    want = float((got * counts).sum() / counts.sum())
    assert evaluate_loss(model, tok.ids, tok.roles) == pytest.approx(want, rel=1e-5)


def test_prompt_tokens_carry_no_label(tokenizer: Any) -> None:
    tok = tokenize_examples(EXAMPLES[:1], tokenizer, 96)
    n_prompt = len(tokenizer(EXAMPLES[0].plain_prompt)["input_ids"])
    n_target = len(tokenizer(EXAMPLES[0].response, add_special_tokens=False)["input_ids"]) + 1
    roles = tok.roles[0].tolist()
    assert roles == [CONTEXT] * n_prompt + [TARGET] * n_target + [PAD] * (96 - n_prompt - n_target)
    assert int(tok.ids[0, n_prompt + n_target - 1]) == tokenizer.eos_token_id


def test_a_long_prompt_is_cut_from_the_left_and_the_response_kept(tokenizer: Any) -> None:
    ex = Example("background " * 200 + "Question: what now?", "Rest and fluids.")
    t_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    tok = tokenize_examples([ex], tokenizer, 32)
    row, roles = tok.ids[0].tolist(), tok.roles[0].tolist()
    assert tok.too_long == () and PAD not in roles
    assert row[-len(t_ids) :] == t_ids and roles[-len(t_ids) :] == [TARGET] * len(t_ids)
    assert row[0] == tokenizer.bos_token_id  # BOS kept, the prompt's start dropped
    prompt_tail = tokenizer(ex.plain_prompt)["input_ids"][-(32 - len(t_ids) - 1) :]
    assert row[1 : 32 - len(t_ids)] == prompt_tail


def test_a_response_longer_than_max_seq_len_is_reported_not_trained(tokenizer: Any) -> None:
    long = Example("Summarize.", "word " * 80)
    tok = tokenize_examples([EXAMPLES[0], long, EXAMPLES[1]], tokenizer, 40)
    assert tok.too_long == (1,)
    assert tok.ids.size(0) == 2
    assert torch.equal(tok.ids, tokenize_examples([EXAMPLES[0], EXAMPLES[1]], tokenizer, 40).ids)


def test_raw_text_is_cut_on_the_right_and_every_token_is_learned(tokenizer: Any) -> None:
    ex = Example("", "word " * 80)
    tok = tokenize_examples([ex], tokenizer, 24)
    assert tok.too_long == () and tok.roles[0, 0] == CONTEXT and (tok.roles[0, 1:] == TARGET).all()


def test_a_chat_template_renders_the_prompt_as_apply_chat_template(tokenizer: Any) -> None:
    chat = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    chat.chat_template = CHATML
    ex = EXAMPLES[1]
    messages = [{"role": "system", "content": ex.system}, {"role": "user", "content": ex.instruction}]
    want = chat.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt, target, templated = render(ex, chat)
    assert templated and prompt == want
    assert target == f"{ex.response}<|im_end|>\n"
    tok = tokenize_examples([ex], chat, 128)
    p_ids = chat(want, add_special_tokens=False)["input_ids"]
    assert tok.ids[0, : len(p_ids)].tolist() == p_ids
    assert (tok.roles[0, : len(p_ids)] == CONTEXT).all() and tok.roles[0, len(p_ids)] == TARGET
    assert render(ex, tokenizer)[2] is False  # no template: the documented plain one
    assert (
        render(ex, tokenizer)[0]
        == "### System:\nBe brief.\n\n### Instruction:\nList the medications.\n\n### Response:\n"
    )


def test_text_fields_choose_instruction_or_raw_text() -> None:
    rec = {"instruction": "Q", "response": "A", "system": "S", "note": "N"}
    assert example_of(rec, ("instruction", "response")) == Example("Q", "A")
    assert example_of(rec, ("system", "instruction", "response")) == Example("Q", "A", "S")
    assert example_of(rec, ("note",)) == Example("", "note: N")
    # the split and the fingerprint hash the same text as before the prompt/response split
    assert Example("Q", "A").text == "### Instruction:\nQ\n\n### Response:\nA"


def test_a_site_reports_too_long_records_and_refuses_when_none_fits(
    fresh_site: Site, start_adapter: ArrayRecord, tokenizer: Any
) -> None:
    """Before any budget is spent: a max-seq-len no response fits is refused; else the count is sent."""
    lengths = sorted(
        len(tokenizer(json.loads(line)["response"], add_special_tokens=False)["input_ids"]) + 1
        for line in fresh_site.data.read_text().splitlines()
    )
    assert lengths[0] > 16  # (scrubbing changes a response's length by a few tokens at most)
    reply = fresh_site.ask_record(start_adapter, fresh_site.request_record(1) | {"max-seq-len": 8})
    assert status(reply) == "refused" and "fits in max-seq-len" in reason(reply)
    assert fresh_site.kinds() == ["refuse"]
    every = fresh_site.ask_record(start_adapter, fresh_site.request_record(2) | {"max-seq-len": 256})
    middle = fresh_site.ask_record(
        start_adapter, fresh_site.request_record(3) | {"max-seq-len": lengths[len(lengths) // 2]}
    )
    assert status(every) == status(middle) == "trained", (reason(every), reason(middle))
    full, cut = (
        {k: float(v) for k, v in r.content.metric_records["metrics"].items() if not isinstance(v, list)}
        for r in (every, middle)
    )
    assert full["records-too-long"] == 0
    assert 0 < full["num-examples"] - cut["num-examples"] <= cut["records-too-long"]  # left out, counted


CONVERSATION = (
    ("system", "Be brief."),
    ("user", "What did the echo show?"),
    ("assistant", "Ejection fraction 55%."),
    ("user", "And the plan?"),
    ("assistant", "Continue metoprolol; recheck in 3 months."),
)


def test_every_assistant_turn_of_a_conversation_is_learned_and_nothing_else(tokenizer: Any) -> None:
    ex = example_of({"messages": [{"role": r, "content": c} for r, c in CONVERSATION]}, ("messages",))
    tok = tokenize_examples([ex], tokenizer, 128)
    ids, roles = tok.ids[0].tolist(), tok.roles[0].tolist()
    learned = [t for t, r in zip(ids, roles, strict=True) if r == TARGET]
    want: list[int] = []
    for role, content in CONVERSATION:
        if role == "assistant":
            want += tokenizer(content, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert learned == want  # both answers, each with its end; no user or system token
    assert ex.text.startswith("### System:\nBe brief.\n\n### User:\nWhat did the echo show?")


def test_a_conversation_under_a_chat_template_renders_as_apply_chat_template(tokenizer: Any) -> None:
    chat = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    chat.chat_template = CHATML
    segments, templated = conversation_segments(CONVERSATION, chat)
    messages = [{"role": r, "content": c} for r, c in CONVERSATION]
    assert templated and "".join(p for p, _ in segments) == chat.apply_chat_template(messages, tokenize=False)
    assert [p for p, learned in segments if learned] == [
        "Ejection fraction 55%.<|im_end|>\n",
        "Continue metoprolol; recheck in 3 months.<|im_end|>\n",
    ]


def test_a_long_conversation_loses_its_oldest_turns_and_never_a_cut_answer(tokenizer: Any) -> None:
    ex = Example("", "", turns=CONVERSATION)
    full = tokenize_examples([ex], tokenizer, 128)
    roles = full.roles[0].tolist()
    n, first = roles.index(PAD), roles.index(TARGET)  # length, where the first answer starts
    last = tokenizer(CONVERSATION[-1][1], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    cut = first - 1 + 3  # everything after BOS up to 3 tokens into the first answer
    short = tokenize_examples([ex], tokenizer, n - cut)
    ids, kept = short.ids[0].tolist(), short.roles[0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids[1:] == full.ids[0, cut + 1 : n].tolist()
    learned = [t for t, r in zip(ids, kept, strict=True) if r == TARGET]
    assert learned == last  # the first answer lost its start: read, not learned; the last one whole
    assert tokenize_examples([ex], tokenizer, len(last)).too_long == (0,)  # the last answer cannot fit


@pytest.mark.parametrize(
    ("messages", "why"),
    [
        ([], "is not a non-empty list"),
        ([{"role": "user", "content": "hi"}], "end with the assistant's turn"),
        ([{"role": "bot", "content": "hi"}], "has role 'bot'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "empty or non-text"),
        ([{"role": "user", "content": "hi", "extra": 1}], "exactly 'role' and 'content'"),
    ],
)
def test_a_malformed_conversation_names_its_line(tmp_path: Path, messages: Any, why: str) -> None:
    path = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": messages}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=why) as err:
        load_records(path, ("messages",))
    assert err.value.line == 2
