"""Batched, cached, streaming generation shared by every decoding method.

A *decoder* turns a prompt batch into next-token scores one step at a time and keeps its own caches
(:class:`BaseDecoder`, :class:`DualHeadDecoder`); :func:`decode_steps` samples from any decoder, so all
methods share prompt encoding, sampling, stopping and streaming.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .backbone import cache_kwargs
from .files import check_positive_int, is_int
from .heads import GateCache
from .model import DualHeadModel, ModelSettings, check_guidance_top_k, check_no_repeat_ngram_size, position_ids_from_mask
from .preference import DEFAULT_OBJECTIVES, parse_objectives, parse_preference
from .static_step import StaticBackbone

Message = dict[str, str]
Prompt = str | Sequence[Message]


@dataclass
class StepOutput:
    """Next-token scores for every row, and the gate value behind them when the method has one."""

    logits: torch.Tensor  # (B, V)
    gate: torch.Tensor | None = None  # (B,)
    base_logits: torch.Tensor | None = None  # (B, V) the frozen backbone's own, when the method computes them anyway


class Decoder(Protocol):
    """One decoding method: ``start`` consumes the prompt batch, ``step`` one new token per row.

    ``start`` also gets the prompt each row answers as a reader would see it (:func:`answered_prompt`: text, or the
    messages of a conversation), for a method that scores text (ARGS); token-level methods ignore it.
    """

    def start(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, preference: torch.Tensor, prompts: Sequence[Prompt] | None = None
    ) -> StepOutput: ...

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> StepOutput: ...


COMPILED_METHODS = ("dualhead", "base")  # the methods whose decoders take compile=True
MODEL_METHODS = ("dualhead", "base")  # decoded from the model itself: no checkpoint of their own


class BaseDecoder:
    """The frozen backbone alone (plain decoding); the preference is ignored.

    ``compile``: run the one-token step compiled over a static cache sized for ``max_new_tokens``
    (:mod:`paretoalign.static_step`).
    """

    def __init__(self, backbone: PreTrainedModel, compile: bool = False, max_new_tokens: int | None = None):
        self.backbone = backbone
        self.cache: DynamicCache | None = None
        self.static = StaticBackbone(backbone, max_new_tokens) if compile else None

    def _read_out(self, hidden: torch.Tensor) -> StepOutput:
        lm_head = self.backbone.get_output_embeddings()
        logits = lm_head(hidden[:, -1]).float()  # (B, V)
        return StepOutput(logits, base_logits=logits)

    def _scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> StepOutput:
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask)[:, -input_ids.shape[1] :],
            use_cache=True,
            **cache_kwargs(type(self.backbone).forward, self.cache),
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()  # (B, V)
        return StepOutput(logits, base_logits=logits)

    def start(self, input_ids, attention_mask, preference, prompts=None) -> StepOutput:
        if self.static is not None:
            return self._read_out(self.static.start(input_ids, attention_mask))
        self.cache = DynamicCache(config=self.backbone.config)
        return self._scores(input_ids, attention_mask)

    def step(self, tokens, attention_mask) -> StepOutput:
        if self.static is not None:
            return self._read_out(self.static.step(tokens, attention_mask))
        return self._scores(tokens, attention_mask)


class DualHeadDecoder:
    """Dual-Head fusion: one backbone pass per token, the gate attending over its own key/value cache.

    ``compile``: the backbone's one-token step runs compiled over a static cache sized for ``max_new_tokens``
    (:mod:`paretoalign.static_step`); the heads stay eager.
    """

    def __init__(
        self,
        model: DualHeadModel,
        fusion: str | None = None,
        strength: float | None = None,
        guidance_top_k: int | None = None,
        compile: bool = False,
        max_new_tokens: int | None = None,
    ):
        if compile and model.reward_branch is not None:
            raise ValueError("compile does not cover a reward branch (reward_layers > 0); decode it with compile=False")
        self.model, self.fusion, self.strength = model, fusion, strength
        self.static = StaticBackbone(model.backbone, max_new_tokens) if compile else None
        self.guidance_top_k = check_guidance_top_k(model.config.guidance_top_k if guidance_top_k is None else guidance_top_k)
        self.cache: DynamicCache | None = None
        self.branch_cache: DynamicCache | None = None  # the reward branch's blocks (reward_layers > 0)
        self.gate_cache: GateCache | None = None
        self.preference: torch.Tensor | None = None
        self.context: torch.Tensor | None = None  # (B, d) the prompt's mean state, for a head that reads it

    def _scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt: bool = False) -> StepOutput:
        model = self.model
        if self.static is None:
            hidden, block_hidden = model.backbone_states(input_ids, attention_mask, self.cache)  # (B, T, d) each
        elif prompt:
            hidden, block_hidden = self.static.start(input_ids, attention_mask), None  # (B, P, d)
        else:
            hidden, block_hidden = self.static.step(input_ids, attention_mask), None  # (B, 1, d)
        if prompt:
            self.context = model.prompt_context(hidden, attention_mask)  # (B, d) or None
        reward_hidden = model.reward_hidden(hidden, block_hidden, attention_mask, self.preference, self.branch_cache)  # (B, T, d)
        logits, gate, lm_logits, self.gate_cache = model.next_token_logits(
            hidden, attention_mask, self.preference, self.gate_cache, self.fusion, self.strength, reward_hidden, self.guidance_top_k,
            self.context,
        )
        return StepOutput(logits, gate, lm_logits)  # (B, V), (B,), (B, V)

    def start(self, input_ids, attention_mask, preference, prompts=None) -> StepOutput:
        self.cache = DynamicCache(config=self.model.backbone.config)
        self.branch_cache = DynamicCache() if self.model.reward_branch is not None else None
        self.gate_cache, self.preference = None, preference
        return self._scores(input_ids, attention_mask, prompt=True)

    def step(self, tokens, attention_mask) -> StepOutput:
        return self._scores(tokens, attention_mask)


@dataclass
class Generation:
    """One generated answer."""

    text: str
    token_ids: list[int]
    tokens: list[str]  # text pieces, one per token; they concatenate to ``text``
    gate: list[float]  # alpha_t behind each token (empty for methods without a gate)
    preference: list[float]
    finish_reason: str  # "eos" or "length"
    prompt: str = field(default="", repr=False)
    base_logprobs: list[float] = field(default_factory=list, repr=False)  # the frozen backbone's log-prob of each token

    @property
    def base_nll(self) -> float | None:
        """The frozen backbone's mean per-token negative log-likelihood of the answer (``None`` when not measured)."""
        return -sum(self.base_logprobs) / len(self.base_logprobs) if self.base_logprobs and len(self.base_logprobs) == len(self.token_ids) else None


@dataclass
class SamplingConfig:
    """How the next token is chosen; ``temperature == 0`` is greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    seed: int | Sequence[int] = 0
    # A guard against loops ("I am. I am. I am."): no n-gram of the answer occurs twice (0: off). It reads the
    # answer's own tokens only, so an answer may still quote the question.
    no_repeat_ngram_size: int = 0

    def __post_init__(self):
        check_positive_int("max_new_tokens", self.max_new_tokens)
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k, 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        check_no_repeat_ngram_size(self.no_repeat_ngram_size)


@dataclass(kw_only=True)
class DecodeSettings(ModelSettings):
    """The model, method settings and sampling of a decoding run: the options ``paretoalign generate`` and
    ``paretoalign sweep`` share (their names, types, defaults and help come from these fields)."""

    method_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "a baseline method's own checkpoint (GenARM: a path template holding {objective}, ARMs or reward "
            "heads trained with train_objective); default: each baseline's shipped one"
        },
    )
    fusion: str | None = field(default=None, metadata={"help": "Dual-Head fusion, gate or genarm (default: the checkpoint's)"})
    strength: float | None = field(default=None, metadata={"help": "steering strength (default: each method's own)"})
    guidance_top_k: int | None = field(
        default=None, metadata={"help": "Dual-Head: steer within the base model's top-k tokens (default: the checkpoint's; 0: all)"}
    )
    no_repeat_ngram_size: int | None = field(
        default=None, metadata={"help": "a loop guard: no n-gram of an answer occurs twice (0: off; default: the checkpoint's)"}
    )
    max_new_tokens: int = 128
    temperature: float = field(default=0.7, metadata={"help": "0 is greedy"})
    top_p: float = 0.9
    top_k: int = 0
    seed: int = 0
    system_prompt: str | None = None
    dtype: str = field(
        default="auto", metadata={"help": "backbone precision: auto (bf16 on a GPU, fp32 on a CPU), float32, bfloat16 or float16"}
    )
    compile: bool = field(
        default=False,
        metadata={"help": "dualhead and base: the backbone's step compiled over a static cache (about a minute to compile once)"},
    )

    def __post_init__(self):
        import math

        from .backbone import parse_dtype
        from .model import FUSION_MODES

        SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed, self.no_repeat_ngram_size or 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.strength is not None and not (isinstance(self.strength, (int, float)) and math.isfinite(self.strength)):
            raise ValueError(f"strength must be a finite number, got {self.strength!r}")
        if self.guidance_top_k is not None:
            check_guidance_top_k(self.guidance_top_k)
        if self.fusion is not None and self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES} or None, got {self.fusion!r}")
        parse_dtype(self.dtype)

    def sampling(self) -> dict:
        """The keyword arguments :func:`generate` takes for these settings (all but the model's own)."""
        names = ("fusion", "strength", "guidance_top_k", "system_prompt", "max_new_tokens", "temperature", "top_p", "top_k",
                 "seed", "no_repeat_ngram_size", "compile", "method_checkpoint")
        return {name: getattr(self, name) for name in names}


@dataclass(kw_only=True)
class GenerateConfig(DecodeSettings):
    """One prompt answered at one preference; ``paretoalign generate`` builds one from its arguments."""

    prompt: str = field(metadata={"help": "the user message"})
    preference: str = field(
        metadata={"help": "weights over the objectives, e.g. 0.2,0.8 (sum to 1); a value starting with '-' needs the = form, --preference=-1,2"}
    )
    objectives: str = field(
        default=",".join(DEFAULT_OBJECTIVES), metadata={"help": "objective names the weights refer to, in order"}
    )
    method: str = field(
        default="dualhead",
        metadata={"help": "a registered decoding method: dualhead (default), base, or a baseline (genarm, parm, args, dualhead-unconditioned)"},
    )

    def __post_init__(self):
        from .methods import get_method

        check_prompt(self.prompt, "--prompt")  # the message names the option a user typed
        super().__post_init__()
        get_method(self.method)
        parse_preference(self.preference, parse_objectives(self.objectives))


def _is_conversation(prompt) -> bool:
    return isinstance(prompt, Sequence) and not isinstance(prompt, str) and all(isinstance(m, dict) for m in prompt) and len(prompt) > 0


def check_prompt(prompt, where: str = "prompt") -> Prompt:
    """A prompt as the decoders take it: non-empty text, or a non-empty list of ``{"role", "content"}`` messages
    with text content (copied down to those two keys). Raises ``ValueError`` naming ``where`` otherwise."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: the prompt is empty")
        return prompt
    messages_ok = (
        isinstance(prompt, Sequence)
        and len(prompt) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt)
    )
    if not messages_ok:
        raise ValueError(f"{where}: a prompt must be a string or a list of {{'role', 'content'}} messages, got {str(prompt)[:120]!r}")
    if not any(m["content"].strip() for m in prompt):
        raise ValueError(f"{where}: every message of the prompt is empty")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def normalize_prompts(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """A single prompt (text or one conversation) or a list of them -> a list of checked prompts (:func:`check_prompt`)."""
    if isinstance(prompts, str) or _is_conversation(prompts):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    return [check_prompt(prompt, f"prompt {number}" if len(prompts) > 1 else "prompt") for number, prompt in enumerate(prompts, start=1)]


def chat_messages(prompt: Prompt, system_prompt: str | None = None) -> list[Message]:
    """The messages a chat template renders: a text prompt as one user message, the system prompt first unless the
    conversation brings its own."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, chat: bool = True, system_prompt: str | None = None) -> str:
    """The text the model sees: the chat template (when the tokenizer has one and ``chat``), else the raw text.

    A conversation whose last message is the assistant's is continued: the answer starts with that message's text
    (a prefilled opening), and the generated text is what follows it."""
    if not (chat and tokenizer.chat_template):
        if not isinstance(prompt, str):
            return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        return prompt
    messages = chat_messages(prompt, system_prompt)
    if messages[-1]["role"] == "assistant":
        return tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str], device: torch.device, templated: bool):
    """Left-padded ``input_ids`` and ``attention_mask``, both ``(B, T)``."""
    # The chat template already holds the special tokens; plain text gets the tokenizer's own.
    encoded = tokenizer(texts, padding=True, padding_side="left", add_special_tokens=not templated, return_tensors="pt")
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, backbone: PreTrainedModel) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(backbone, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def _guard(logits: torch.Tensor, answers: torch.Tensor, guard: NoRepeatNGramLogitsProcessor | None) -> torch.Tensor:
    """``logits`` ``(B, V)`` with the tokens that would repeat an n-gram of ``answers`` ``(B, t)`` masked; a row whose
    every candidate would (possible after a top-k restriction) keeps its scores: a repeat beats no answer."""
    if guard is None:
        return logits
    guarded = guard(answers, logits)  # (B, V), a new tensor
    stuck = ~torch.isfinite(guarded).any(dim=-1, keepdim=True)  # (B, 1)
    return torch.where(stuck, logits, guarded)


def _choose(logits: torch.Tensor, sampling: SamplingConfig, warpers: LogitsProcessorList, generators) -> torch.Tensor:
    """Next tokens ``(B,)`` from scores ``(B, V)``; every row draws from its own generator."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    scores = warpers(None, logits / sampling.temperature)  # (B, V)
    probs = torch.softmax(scores, dim=-1)  # (B, V)
    draws = [torch.multinomial(probs[row], 1, generator=generators[row]) for row in range(probs.shape[0])]
    return torch.cat(draws)  # (B,)


@dataclass
class DecodeStep:
    """What one decoding step produced for every row."""

    tokens: torch.Tensor  # (B,) chosen token ids
    gate: torch.Tensor | None  # (B,)
    active: torch.Tensor  # (B,) bool: row was still generating at this step
    finished: torch.Tensor  # (B,) bool: row has stopped (after this step)
    base_logprob: torch.Tensor | None = None  # (B,) the frozen backbone's log-probability of each chosen token


@torch.no_grad()
def decode_steps(
    decoder: Decoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    preference: torch.Tensor,
    sampling: SamplingConfig,
    eos_ids: Sequence[int],
    pad_id: int,
    prompts: Sequence[Prompt] | None = None,
) -> Iterator[DecodeStep]:
    """Run ``decoder`` from left-padded prompts, yielding one :class:`DecodeStep` per new token (``prompts``: what
    each row answers, for :meth:`Decoder.start`)."""
    batch, device = input_ids.shape[0], input_ids.device
    seeds = [sampling.seed] * batch if isinstance(sampling.seed, int) else list(sampling.seed)
    if len(seeds) != batch:
        raise ValueError(f"seed gives {len(seeds)} values for a batch of {batch}")
    # One generator per row, seeded alike: a row samples the same text alone or inside any batch.
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    warpers = LogitsProcessorList()
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    guard = NoRepeatNGramLogitsProcessor(sampling.no_repeat_ngram_size) if sampling.no_repeat_ngram_size else None
    answers = input_ids.new_zeros(batch, 0)  # (B, t) the tokens chosen so far, what the guard reads
    eos = torch.tensor(list(eos_ids), device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = decoder.start(input_ids, attention_mask, preference, prompts)
    for step in range(sampling.max_new_tokens):
        active = ~finished
        tokens = torch.where(active, _choose(_guard(out.logits, answers, guard), sampling, warpers, generators), pad_id)  # (B,)
        if guard is not None:
            answers = torch.cat([answers, tokens[:, None]], dim=1)
        finished = finished | torch.isin(tokens, eos)
        base_logprob = None
        if out.base_logits is not None:  # what the frozen model thinks of the chosen token: a fluency measure for free
            base_logprob = torch.log_softmax(out.base_logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)  # (B,)
        yield DecodeStep(tokens, out.gate, active, finished.clone(), base_logprob)
        if finished.all() or step == sampling.max_new_tokens - 1:
            return
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)  # (B, P + 1)
        out = decoder.step(tokens[:, None], attention_mask)


class GenerationRun:
    """Accumulates decode steps into per-row :class:`Generation` objects, decoding text as it grows."""

    def __init__(self, tokenizer, texts: list[str], preference: torch.Tensor, eos_ids: Sequence[int]):
        self.tokenizer, self.prompts, self.eos_ids = tokenizer, texts, set(eos_ids)
        self.preference = preference.tolist()
        self.token_ids: list[list[int]] = [[] for _ in texts]
        self.pieces: list[list[str]] = [[] for _ in texts]
        self.texts = [""] * len(texts)
        self.gates: list[list[float]] = [[] for _ in texts]
        self.base_logprobs: list[list[float]] = [[] for _ in texts]
        self.finish = ["length"] * len(texts)

    def _append_token(self, row: int, token: int) -> None:
        self.token_ids[row].append(token)
        current = self.tokenizer.decode(self.token_ids[row], skip_special_tokens=True)
        previous, pieces = self.texts[row], self.pieces[row]
        common = len(os.path.commonprefix([previous, current]))
        # A byte-level tokenizer may complete a character (replacing a trailing "\ufffd") only with a later
        # token: take the changed tail back from the earlier pieces and give it to this token.
        surplus = len(previous) - common
        index = len(pieces) - 1
        while surplus > 0 and index >= 0:
            cut = min(surplus, len(pieces[index]))
            pieces[index] = pieces[index][: len(pieces[index]) - cut]
            surplus, index = surplus - cut, index - 1
        pieces.append(current[common:])
        self.texts[row] = current

    def add(self, step: DecodeStep) -> None:
        tokens = step.tokens.tolist()
        gates = step.gate.float().tolist() if step.gate is not None else None
        base = step.base_logprob.tolist() if step.base_logprob is not None else None
        for row, is_active in enumerate(step.active.tolist()):
            if not is_active:
                continue
            if tokens[row] in self.eos_ids:
                self.finish[row] = "eos"
                continue
            self._append_token(row, tokens[row])
            if gates is not None:
                self.gates[row].append(gates[row])
            if base is not None:
                self.base_logprobs[row].append(base[row])

    def results(self) -> list[Generation]:
        return [
            Generation(
                self.texts[row], list(ids), list(self.pieces[row]), list(self.gates[row]), self.preference[row], self.finish[row],
                self.prompts[row], list(self.base_logprobs[row]),
            )
            for row, ids in enumerate(self.token_ids)
        ]


def answered_prompt(prompt: Prompt, system_prompt: str | None = None) -> Prompt:
    """What a chat-templated row answers, as a reward model reads it: one user message as its text, a conversation
    as its messages (the system prompt first, as :func:`render_prompt` gives it). (Without a template a row answers
    the text the model sees.)"""
    messages = chat_messages(prompt, system_prompt)
    return messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user" else messages


class PromptBatch(NamedTuple):
    """Rows ready to decode: the rendered texts, left-padded ids and mask ``(B, T)``, preferences ``(B, k)``, and what
    each row answers (:func:`answered_prompt`)."""

    texts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    preference: torch.Tensor
    prompts: list[Prompt]


def prepare_batch(model: DualHeadModel, prompts, preference, chat: bool = True, system_prompt: str | None = None) -> PromptBatch:
    """Normalise prompts and preferences into rows: one prompt may fan out over many preferences."""
    prompts = normalize_prompts(prompts)
    rows = torch.as_tensor(preference, dtype=torch.float64)
    if rows.dim() == 2 and len(prompts) == 1 and rows.shape[0] > 1:
        prompts = prompts * rows.shape[0]  # one prompt, a sweep of preferences
    preference = model.preference_batch(rows, len(prompts))  # (B, k)
    templated = bool(chat and model.tokenizer.chat_template)
    texts = [render_prompt(model.tokenizer, p, chat, system_prompt) for p in prompts]
    input_ids, attention_mask = encode_prompts(model.tokenizer, texts, model.device, templated)
    answered = [answered_prompt(p, system_prompt) if templated else text for p, text in zip(prompts, texts)]
    return PromptBatch(texts, input_ids, attention_mask, preference, answered)


def make_decoder(
    model: DualHeadModel,
    method: str = "dualhead",
    fusion: str | None = None,
    strength: float | None = None,
    guidance_top_k: int | None = None,
    compile: bool = False,
    max_new_tokens: int | None = None,
    method_checkpoint: str | None = None,
) -> Decoder:
    """The decoder for ``method``, any name of the registry in :mod:`paretoalign.methods` (``dualhead``, ``base``,
    ``genarm``, ``parm``, ``args``, ...); an unknown name raises ``ValueError`` listing the registered ones.
    ``compile`` (``dualhead`` and ``base``): a compiled static-cache step sized for ``max_new_tokens``.
    ``method_checkpoint``: a baseline's own checkpoint (GenARM: a path template holding ``{objective}``); default its
    shipped one. ``dualhead`` and ``base`` refuse it (the Dual-Head's heads are ``model``'s)."""
    from .methods import build_decoder  # the registry imports this module

    if compile and method not in COMPILED_METHODS:
        raise ValueError(f"compile covers the {' and '.join(map(repr, COMPILED_METHODS))} methods, got method {method!r}")
    if method_checkpoint is not None and method in MODEL_METHODS:
        raise ValueError(f"method_checkpoint is a baseline's checkpoint; method {method!r} has none, got {method_checkpoint!r}")
    options = {"compile": compile, "max_new_tokens": max_new_tokens} if compile else {}
    if method_checkpoint is not None:
        options["checkpoint"] = method_checkpoint
    return build_decoder(method, model, fusion=fusion, strength=strength, guidance_top_k=guidance_top_k, **options)


def _runs(model, prompts, preference, method, fusion, strength, guidance_top_k, chat, system_prompt, decoder, sampling) -> Iterator[GenerationRun]:
    compile = bool(sampling.pop("compile", False))
    method_checkpoint = sampling.pop("method_checkpoint", None)
    if sampling.get("no_repeat_ngram_size") is None:  # the checkpoint's loop guard
        sampling["no_repeat_ngram_size"] = model.config.no_repeat_ngram_size
    sampling_config = SamplingConfig(**sampling)
    batch = prepare_batch(model, prompts, preference, chat, system_prompt)
    eos_ids = eos_token_ids(model.tokenizer, model.backbone)
    decoder = decoder or make_decoder(model, method, fusion, strength, guidance_top_k, compile, sampling_config.max_new_tokens, method_checkpoint)
    run = GenerationRun(model.tokenizer, batch.texts, batch.preference, eos_ids)
    model.eval()
    pad_id = model.tokenizer.pad_token_id
    for step in decode_steps(decoder, batch.input_ids, batch.attention_mask, batch.preference, sampling_config, eos_ids, pad_id, batch.prompts):
        run.add(step)
        yield run


def stream_generate(
    model: DualHeadModel,
    prompts: Prompt | Sequence[Prompt],
    preference,
    *,
    method: str = "dualhead",
    fusion: str | None = None,
    strength: float | None = None,
    guidance_top_k: int | None = None,
    chat: bool = True,
    system_prompt: str | None = None,
    decoder: Decoder | None = None,
    **sampling,
) -> Iterator[list[Generation]]:
    """Like :func:`generate`, but yields every row's :class:`Generation` so far after each new token."""
    for run in _runs(model, prompts, preference, method, fusion, strength, guidance_top_k, chat, system_prompt, decoder, sampling):
        yield run.results()


def generate(
    model: DualHeadModel,
    prompts: Prompt | Sequence[Prompt],
    preference,
    *,
    method: str = "dualhead",
    fusion: str | None = None,
    strength: float | None = None,
    guidance_top_k: int | None = None,
    chat: bool = True,
    system_prompt: str | None = None,
    decoder: Decoder | None = None,
    **sampling,
) -> list[Generation]:
    """Generate one answer per row, batched with left padding and KV caches.

    Args:
        prompts: a string, one chat (a list of ``{"role", "content"}`` messages), or a list of either.
        preference: ``(k,)`` shared by all rows, ``(B, k)`` one per row, or ``(P, k)`` with a single prompt
            to sweep ``P`` preferences in one batch.
        method: a registered method (:mod:`paretoalign.methods`: ``dualhead``, ``base``, ``genarm``, ...); ``decoder``
            overrides it with any :class:`Decoder`.
        fusion, strength, guidance_top_k: override the model's defaults (``gate``/``genarm``; steering strength; steer
            within the base model's top-k tokens, 0: all).
        sampling: ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``top_k``, ``seed`` (an int,
            or one per row), ``no_repeat_ngram_size`` (a loop guard, 0: off; default the checkpoint's); see
            :class:`SamplingConfig`. ``compile=True`` (``dualhead`` and ``base``) runs the
            backbone's step compiled over a static cache: about a minute to compile, then faster per token.
            ``method_checkpoint``: a baseline's own checkpoint (GenARM: a path template holding ``{objective}``).
    """
    run = None
    for run in _runs(model, prompts, preference, method, fusion, strength, guidance_top_k, chat, system_prompt, decoder, sampling):
        pass
    return run.results()
