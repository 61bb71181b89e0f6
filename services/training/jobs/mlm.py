"""Masked-LM pretraining from scratch: a BERT encoder on a corpus, with Ray Train across workers.

A job config, as submitted (only `tokenizer`, `corpus` and `model_name` are required; the loop's
settings are those of pretraining, see lm_loop.LoopConfig):

    {"tokenizer": "wp", "corpus": ["topics"], "model_name": "tiny-bert",
     "hidden_size": 128, "num_layers": 2, "num_heads": 4, "seq_len": 128, "max_steps": 1000}

The data is prepared as for causal pretraining, packed into rows of `seq_len - 2` tokens with
the separator token between documents; each row becomes `[CLS] row [SEP]`. BERT's recipe picks
15% (`mask_probability`) of the non-special positions as targets, of which 80% become the mask
token, 10% a random token and 10% stay as they are. The masks are drawn from a generator seeded
by the row's position in the data stream, so a resumed run masks exactly as the lost one would
have. The held-out rows are masked the same way at every evaluation, and judged by the loss
and the accuracy on their masked positions. The model is `transformers`' BertForMaskedLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from libs.common.artifacts import check_name
from libs.common.planning import ModelShape, training_memory
from services.training.dataprep.stage import require
from services.training.jobs import JobContext, parse_config
from services.training.jobs.data import DataConfig, check_data, prepare_data
from services.training.jobs.lm_loop import LoopConfig, Objective, Sums, train_and_register
from services.training.jobs.resources import check_gpu, check_memory
from services.training.jobs.tokenizer import describe_tokenizer, special_token, token_id
from services.training.jobstore import JobRecord

MASK_TOKENS = ("[MASK]", "<mask>")
CLS_TOKENS = ("[CLS]", "<s>")
SEP_TOKENS = ("[SEP]", "</s>")
PAD_TOKENS = ("[PAD]", "<pad>")
IGNORE = -100  # label of positions that are not predicted (transformers' convention)
REPLACE_WITH_MASK, REPLACE_AT_RANDOM = 0.8, 0.1


@dataclass(kw_only=True)
class MaskedLMConfig(DataConfig, LoopConfig):
    """A BERT-style masked-LM pretraining job."""

    model_name: str
    """Name under which the finished model is registered."""
    mask_token: str = ""
    """"" picks the first of MASK_TOKENS the tokeniser has; a tokeniser with none is refused."""
    cls_token: str = ""
    """Opens every row; "" picks the first of CLS_TOKENS the tokeniser has."""
    sep_token: str = ""
    """Ends every row and separates documents; "" picks the first of SEP_TOKENS."""
    mask_probability: float = 0.15
    """Share of non-special positions predicted in each row."""
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 0
    """Feed-forward width; 0: 4 * hidden_size."""

    def __post_init__(self) -> None:
        check_name(self.model_name, "model_name")
        self.check_data()
        super().__post_init__()
        for name in ("hidden_size", "num_layers", "num_heads"):
            require(getattr(self, name) >= 1, "must be >= 1", name)
        require(self.hidden_size % self.num_heads == 0, "must be a multiple of num_heads", "hidden_size")
        require(self.intermediate_size >= 0, "must be >= 0", "intermediate_size")
        require(0 < self.mask_probability < 1, "must be in (0, 1)", "mask_probability")
        require(self.seq_len >= 4, "must be >= 4 ([CLS], [SEP] and two tokens)", "seq_len")

    def shape(self, vocab_size: int) -> ModelShape:
        return ModelShape(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            vocab_size=vocab_size,
            intermediate_size=self.intermediate_size or 4 * self.hidden_size,
            gated_mlp=False,
            tie_embeddings=True,
        )

    def bert_config(self, vocab_size: int, pad_id: int) -> BertConfig:
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size or 4 * self.hidden_size,
            max_position_embeddings=self.seq_len,
            type_vocab_size=1,
            pad_token_id=pad_id,
        )


@dataclass(frozen=True)
class Specials:
    mask: str
    cls: str
    sep: str


def specials(cfg: MaskedLMConfig, info: Any) -> Specials:
    """The tokeniser's mask, classifier and separator tokens; refused, naming the setting, where one is missing."""
    return Specials(
        mask=special_token(info, cfg.mask_token, MASK_TOKENS, "mask_token", "mask"),
        cls=special_token(info, cfg.cls_token, CLS_TOKENS, "cls_token", "classifier ([CLS])"),
        sep=special_token(info, cfg.sep_token, SEP_TOKENS, "sep_token", "separator ([SEP])"),
    )


class MaskedLM(Objective):
    """The lm_loop objective: BERT's masked-token prediction over `[CLS] row [SEP]`."""

    def __init__(self, config: BertConfig, ids: dict[str, int], special_ids: list[int], cfg: MaskedLMConfig) -> None:
        self.config = config.to_dict()
        self.mask_id, self.cls_id, self.sep_id = ids["mask"], ids["cls"], ids["sep"]
        self.special_ids = torch.tensor(sorted(set(special_ids)))
        self.vocab_size = config.vocab_size
        self.probability = cfg.mask_probability
        self.seed = cfg.seed

    def build(self) -> torch.nn.Module:
        return BertForMaskedLM(BertConfig.from_dict(self.config))

    def mask(self, rows: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of `[CLS] row [SEP]`: 80/10/10 on the chosen positions, IGNORE elsewhere.
        Drawn on the CPU (the same masks on any device), returned on the rows' device."""
        device, rows = rows.device, rows.cpu()
        n = len(rows)
        inputs = torch.cat([torch.full((n, 1), self.cls_id), rows, torch.full((n, 1), self.sep_id)], dim=1)
        generator = torch.Generator().manual_seed(seed)
        draw = torch.rand(inputs.shape, generator=generator)
        chosen = (draw < self.probability) & ~torch.isin(inputs, self.special_ids)
        if not chosen.any():  # a row of one or two tokens can draw nothing; predict its first token
            chosen[0, 1] = True
        labels = torch.where(chosen, inputs, IGNORE)
        how = torch.rand(inputs.shape, generator=generator)
        inputs = torch.where(chosen & (how < REPLACE_WITH_MASK), self.mask_id, inputs)
        at_random = chosen & (how >= REPLACE_WITH_MASK) & (how < REPLACE_WITH_MASK + REPLACE_AT_RANDOM)
        random_ids = torch.randint(self.vocab_size, inputs.shape, generator=generator)
        return torch.where(at_random, random_ids, inputs).to(device), labels.to(device)

    def loss(self, model: torch.nn.Module, batch: torch.Tensor, position: int) -> torch.Tensor:
        inputs, labels = self.mask(batch, self.seed * 1_000_003 + position)
        loss: torch.Tensor = model(input_ids=inputs, labels=labels).loss
        return loss

    def heldout(self, model: torch.nn.Module, batch: torch.Tensor) -> Sums:
        # Seeded by the rows themselves: the same held-out rows get the same masks at every evaluation.
        inputs, labels = self.mask(batch, self.seed + int(batch[:, :4].sum()))
        logits = model(input_ids=inputs).logits
        picked = labels != IGNORE
        count = float(picked.sum())
        loss = F.cross_entropy(logits[picked], labels[picked], reduction="sum").item()
        correct = float((logits[picked].argmax(-1) == labels[picked]).sum())
        return {"loss": (loss, count), "accuracy": (correct, count)}

    def metrics(self, heldout: dict[str, float]) -> dict[str, float]:
        return {
            "eval_loss": heldout["loss"],
            "eval_accuracy": heldout["accuracy"],
            "perplexity": math.exp(min(heldout["loss"], 50.0)),
        }


class MaskedLMJob:
    def check(self, config: dict[str, Any], context: JobContext) -> dict[str, Any]:
        """Refuse what cannot run (a tokeniser without a mask token among it); pins the tokeniser's version."""
        cfg = parse_config(MaskedLMConfig, config)
        check_gpu(cfg.use_gpu, context)
        info = describe_tokenizer(context, cfg.tokenizer)
        specials(cfg, info)
        check_data(cfg, context, cfg.seq_len - 2, info)
        need = training_memory(cfg.shape(info.vocab_size), cfg.micro_batch_size, cfg.seq_len, precision="fp32")
        check_memory(context, need)
        return {**config, "tokenizer": info.ref}

    def run(self, job: JobRecord, context: JobContext) -> str:
        cfg = parse_config(MaskedLMConfig, job.config)
        info = describe_tokenizer(context, cfg.tokenizer)
        names = specials(cfg, info)
        ids = {role: token_id(context, cfg.tokenizer, getattr(names, role)) for role in ("mask", "cls", "sep")}
        special_ids = [token_id(context, cfg.tokenizer, t) for t in info.special_tokens]
        pad = next((t for t in PAD_TOKENS if t in info.special_tokens), None)
        pad_id = token_id(context, cfg.tokenizer, pad) if pad else 0
        dataset = prepare_data(job, cfg, context, cfg.seq_len - 2, ids["sep"], info.vocab_size)
        objective = MaskedLM(cfg.bert_config(info.vocab_size, pad_id), ids, special_ids, cfg)
        parameters = cfg.shape(info.vocab_size).param_count()
        return train_and_register(job, context, dataset, objective, cfg, info, parameters)
