"""Records to token ids and token roles: what the model reads, and what it is trained to write.

An :class:`Example` is one record as trained: an instruction (the prompt; with an optional system
field) and the response it teaches, or raw text (no instruction). The prompt is rendered with the
tokenizer's chat template when it has one, otherwise with the plain template
(:data:`PLAIN_TEMPLATE`). Every token gets a role (:data:`PAD`, :data:`TARGET`, :data:`CONTEXT`):
the loss of a record is the mean over its own ``TARGET`` tokens only, so the model is never trained
to produce the prompts. A mask of 0 / 1 (every real token a target) is the raw-text case.

Truncation keeps the label: the prompt is cut from the left (its first token kept when it is BOS),
and a record whose response alone does not fit in ``max_len`` is left out of training and reported
(:attr:`Tokenized.too_long`), never trained on a cut label. Raw text longer than ``max_len`` is
split into chunks (``chunk=True``; consecutive chunks overlap by one token, so every token after the
first is predicted exactly once) that stay one record: :attr:`Tokenized.group` names each row's
record, and the record's loss and clipped gradient cover all of its chunks. Different records are
never packed into one row. With ``chunk=False`` raw text is cut on the right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PAD, TARGET, CONTEXT = 0, 1, 2
"""Token roles: padding (not attended), a target (attended and in the loss), context (attended only)."""

PLAIN_TEMPLATE = "{system}### Instruction:\n{instruction}\n\n### Response:\n"
"""The prompt of a tokenizer without a chat template (``system`` rendered as ``### System:\\n...\\n\\n``)."""


@dataclass(frozen=True)
class Example:
    """One scrubbed record as trained: ``instruction`` (empty for raw text), ``response``, ``system``.

    A preference pair (DPO) also has ``rejected``: ``response`` is the chosen answer to the prompt.
    A multi-turn conversation has ``turns`` instead, ``(role, content)`` pairs ending with the
    assistant's: every assistant turn is learned, every other turn only read.
    """

    instruction: str
    response: str
    system: str = ""
    rejected: str = ""
    turns: tuple[tuple[str, str], ...] = ()

    def to_row(self) -> list[Any]:
        """The example as a JSON row (the scrub cache): four strings and the ``[role, content]`` turns."""
        return [self.instruction, self.response, self.system, self.rejected, [list(t) for t in self.turns]]

    @classmethod
    def from_row(cls, row: list[Any]) -> Example:
        """The example of a :meth:`to_row` row."""
        return cls(row[0], row[1], row[2], row[3], tuple((r, c) for r, c in row[4]))

    @property
    def plain_prompt(self) -> str:
        """The prompt in the plain template ("" for raw text)."""
        if not self.instruction:
            return ""
        system = f"### System:\n{self.system}\n\n" if self.system else ""
        return PLAIN_TEMPLATE.format(system=system, instruction=self.instruction)

    @property
    def text(self) -> str:
        """The record in the plain template: what the held-out split and the data fingerprint hash."""
        if self.turns:
            return "".join(piece for piece, _ in plain_segments(self.turns))
        if self.rejected:
            return f"{self.plain_prompt}{self.response}\n\n### Rejected:\n{self.rejected}"
        return self.plain_prompt + self.response


def example_of(record: Mapping[str, Any], fields: Sequence[str], kind: str = "sft") -> Example:
    """The :class:`Example` of one (scrubbed) record of training kind ``kind`` with its ``fields``.

    ``cpt``: the fields are raw text, joined. ``dpo``: the fields are prompt, chosen, rejected.
    ``sft``: ``messages`` is a conversation; ``instruction`` + ``response`` (and optionally
    ``system``) an instruction example; any other fields are raw text, ``field: value`` paragraphs,
    all of it trained on.
    """
    if kind == "cpt":
        return Example("", "\n\n".join(str(record[f]) for f in fields))
    if kind == "dpo":
        prompt, chosen, rejected = fields
        return Example(str(record[prompt]), str(record[chosen]), "", str(record[rejected]))
    if tuple(fields) == ("messages",):
        return Example("", "", turns=tuple((str(m["role"]), str(m["content"])) for m in record["messages"]))
    if {"instruction", "response"} <= set(fields) <= {"system", "instruction", "response"}:
        system = record["system"] if "system" in fields else ""  # only a listed field is scrubbed
        return Example(record["instruction"], record["response"], system)
    return Example("", "\n\n".join(f"{f}: {record[f]}" for f in fields))


def _messages(ex: Example) -> list[dict[str, str]]:
    return ([{"role": "system", "content": ex.system}] if ex.system else []) + [
        {"role": "user", "content": ex.instruction}
    ]


def render(ex: Example, tokenizer: Any) -> tuple[str, str, bool]:
    """``(prompt, target, templated)``: the chat template's rendering when the tokenizer has one.

    With a chat template the target is what the template puts after the generation prompt for the
    assistant's turn (the response and the template's end-of-turn text).
    """
    if not ex.instruction or not getattr(tokenizer, "chat_template", None):
        return ex.plain_prompt, ex.response, False
    prompt = tokenizer.apply_chat_template(_messages(ex), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*_messages(ex), {"role": "assistant", "content": ex.response}], tokenize=False
    )
    if not full.startswith(prompt):  # a template that rewrites earlier turns: fall back to its prompt
        return prompt, ex.response, True
    return prompt, full[len(prompt) :], True


Segment = tuple[str, bool]  # a piece of text and whether it is learned


def plain_segments(turns: Sequence[tuple[str, str]]) -> list[Segment]:
    """A conversation in the plain template: ``### System`` / ``### User`` / ``### Assistant`` headers."""
    out: list[Segment] = []
    for role, content in turns:
        if role == "assistant":
            out.append((content, True))
        elif role == "system":
            out.append((f"### System:\n{content}\n\n", False))
        else:
            out.append((f"### User:\n{content}\n\n### Assistant:\n", False))
    return out


def conversation_segments(turns: Sequence[tuple[str, str]], tokenizer: Any) -> tuple[list[Segment], bool]:
    """``(segments, templated)`` of a conversation: each assistant turn (with the template's end of
    turn) learned, everything between read; the chat template's rendering when it has one and it
    extends each prefix, otherwise the plain template."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": r, "content": c} for r, c in turns]
        segments: list[Segment] = []
        done = ""
        for k, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                break  # a template that rewrites earlier turns: use the plain one
            segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        else:
            return segments, True
    return plain_segments(turns), False


def _encode_conversation(ex: Example, tokenizer: Any, max_len: int) -> list[Row] | None:
    """A conversation's one row: assistant turns learned; the oldest turns cut first, the last kept."""
    segments, templated = conversation_segments(ex.turns, tokenizer)
    ids: list[int] = []
    roles: list[int] = []
    eos = tokenizer.eos_token_id
    for i, (piece, learned) in enumerate(segments):
        toks: list[int] = tokenizer(piece, add_special_tokens=i == 0 and not templated, verbose=False)[
            "input_ids"
        ]
        if learned and not templated and eos is not None:
            toks.append(int(eos))
        ids += toks
        roles += [TARGET if learned else CONTEXT] * len(toks)
    last = len(roles) - roles[::-1].index(CONTEXT) if CONTEXT in roles else 0  # where the last answer starts
    if len(ids) - last > max_len - 1:
        return None
    if len(ids) > max_len:
        bos = tokenizer.bos_token_id
        keep = 1 if bos is not None and ids[:1] == [bos] else 0
        cut = len(ids) - max_len  # tokens to drop after the kept BOS
        ids, roles = ids[:keep] + ids[keep + cut :], roles[:keep] + roles[keep + cut :]
        k = keep
        while k < len(roles) and roles[k] == TARGET:  # an answer that lost its beginning is not learned
            roles[k] = CONTEXT
            k += 1
    return [(ids, roles)]


@dataclass(frozen=True)
class Tokenized:
    """Token ids and roles, ``[rows, max_len]`` right-padded; each row's record; records left out."""

    ids: torch.Tensor
    roles: torch.Tensor
    group: torch.Tensor  # [rows]: the record of each row, 0..records-1, rows of a record adjacent
    too_long: tuple[int, ...]  # indices (into the examples) whose response alone exceeds max_len

    @property
    def records(self) -> int:
        """Records kept (a chunked document is one)."""
        return int(self.group.max()) + 1 if self.group.numel() else 0

    @property
    def chunked(self) -> bool:
        """Whether some record spans several rows."""
        return self.records != self.ids.size(0)


Row = tuple[list[int], list[int]]


def _chunks(ids: list[int], max_len: int) -> list[Row]:
    """Raw text in rows of ``max_len`` overlapping by one token: the first token of a row is context."""
    if len(ids) <= max_len:
        return [(ids, [CONTEXT] + [TARGET] * (len(ids) - 1))]
    stride = max_len - 1
    rows = []
    for start in range(0, len(ids) - 1, stride):
        part = ids[start : start + max_len]
        rows.append((part, [CONTEXT] + [TARGET] * (len(part) - 1)))
    return rows


def _encode(ex: Example, tokenizer: Any, max_len: int, chunk: bool) -> list[Row] | None:
    """One record's rows within ``max_len``; ``None`` when its label cannot fit.

    A preference pair is two rows, chosen then rejected, each with the prompt.
    """
    if ex.turns:
        return _encode_conversation(ex, tokenizer, max_len)
    if ex.rejected:
        rows = [_encode(Example(ex.instruction, answer, ex.system), tokenizer, max_len, chunk) for answer in
                (ex.response, ex.rejected)]  # fmt: skip
        return None if rows[0] is None or rows[1] is None else rows[0] + rows[1]
    prompt, target, templated = render(ex, tokenizer)
    p_ids: list[int] = tokenizer(prompt, add_special_tokens=not templated, verbose=False)["input_ids"]
    t_ids: list[int] = tokenizer(target, add_special_tokens=False, verbose=False)["input_ids"]
    if not templated and tokenizer.eos_token_id is not None:
        t_ids.append(int(tokenizer.eos_token_id))
    if not ex.instruction:  # raw text: every token after the first a target
        ids = p_ids + t_ids
        return _chunks(ids, max_len) if chunk else _chunks(ids[:max_len], max_len)
    room = max_len - len(t_ids)
    if room < 1:  # the first target token needs one token of context before it
        return None
    if len(p_ids) > room:
        bos = tokenizer.bos_token_id
        keep_bos = bos is not None and p_ids[:1] == [bos] and room > 1
        p_ids = [bos, *p_ids[len(p_ids) - room + 1 :]] if keep_bos else p_ids[len(p_ids) - room :]
    return [(p_ids + t_ids, [CONTEXT] * len(p_ids) + [TARGET] * len(t_ids))]


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, max_len: int, *, chunk: bool = True
) -> Tokenized:
    """Every example that fits, right-padded to ``max_len``; see the module docstring for the rules."""
    import torch

    rows: list[Row] = []
    group: list[int] = []
    too_long = []
    for i, ex in enumerate(examples):
        enc = _encode(ex, tokenizer, max_len, chunk)
        if enc is None:
            too_long.append(i)
            continue
        group.extend([i - len(too_long)] * len(enc))
        rows.extend(enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), max_len), int(pad or 0), dtype=torch.long)
    roles = torch.zeros((len(rows), max_len), dtype=torch.long)
    for r, (row_ids, row_roles) in enumerate(rows):
        ids[r, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        roles[r, : len(row_roles)] = torch.tensor(row_roles, dtype=torch.long)
    return Tokenized(ids, roles, torch.tensor(group, dtype=torch.long), tuple(too_long))


def take_records(
    ids: torch.Tensor, roles: torch.Tensor, group: torch.Tensor, records: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of ``records`` (record indices), with their group renumbered ``0..len(records)-1``."""
    import torch

    chosen = torch.sort(records).values
    rows = torch.isin(group, chosen)
    local = torch.searchsorted(chosen, group[rows])
    return ids[rows], roles[rows], local
