"""The decoder as a Hugging Face causal LM: `AblateConfig` (`model_type: ablate`) and
`AblateForCausalLM` (a `PreTrainedModel` with `GenerationMixin`), registered with `AutoConfig` and
`AutoModelForCausalLM` on import.

Imported lazily (never by `import models`, which needs torch only). `ablate export-hf`
(train/export.py) writes this file, rewritten to flat relative imports, as the exported folder's
`modeling_ablate.py`, next to the flat copies of the model modules it needs; so this file must
import only torch, transformers, the standard library and `models`.

- The config carries the run's resolved `model:` section (`ablate`) and the plain module
  attributes the training schedule had set (`schedule`: the ReLU fine-tune switch, the step the
  stochastic activations key their per-call draw on), so the forward is exactly the decoder's,
  parameterization multipliers included.
- `attention_mask` (left padding, as batched `generate` pads): when every mixer takes a padding
  mask (`takes_pad_mask`) and nothing keys on absolute positions, the batch runs at once with
  per-row RoPE positions; otherwise (stateful mixers such as DeltaNet, where exact masking is
  impossible by construction) each row runs unpadded and is re-padded.
- `generate` keeps the decoder's own decode cache (`Decoder.new_cache()`: KV for attention,
  recurrent state for DeltaNet) in an `AblateCache`, created by `forward` when `use_cache` is
  set, as transformers' stateful models (Mamba) do: `_supports_default_dynamic_cache` is False.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput as HFModelOutput

from models import Decoder, model_config
from models.rope import RotaryEmbedding


class AblateConfig(PretrainedConfig):
    """`ablate`: the run's `model:` section with every key resolved (vocab_size included);
    `schedule`: see `schedule_state`. The standard fields are derived from `ablate`."""

    model_type = "ablate"

    ablate: dict | None = None
    schedule: dict | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.ablate is not None:
            m = self.ablate
            self.vocab_size, self.hidden_size = m["vocab_size"], m["d_model"]
            self.num_hidden_layers, self.num_attention_heads = m["n_layers"], m["n_heads"]
            self.num_key_value_heads = m.get("n_kv_heads") or m["n_heads"]
            self.max_position_embeddings = m["max_seq_len"]
            self.tie_word_embeddings = bool(m.get("tie_embeddings", True))
        super().__post_init__(**kwargs)


def schedule_state(model: nn.Module) -> dict[str, Any]:
    """The plain attributes the training schedule (train/callbacks/activation_schedule.py) sets on
    modules and no checkpoint holds: which activations run the ReLU fine-tune, and the train
    step (it keys the stochastic activations' per-call draw)."""
    relu = sorted(name for name, m in model.named_modules() if getattr(m, "relu_finetune", False))
    steps = {int(m.step) for m in model.modules() if hasattr(m, "set_train_step")}
    return {"relu_finetune": relu, "train_step": max(steps, default=0)}


def apply_schedule_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Set what `schedule_state` recorded on a freshly built decoder."""
    modules = dict(model.named_modules())
    for name in state.get("relu_finetune", []):
        modules[name].relu_finetune = True
    for m in model.modules():
        if hasattr(m, "set_train_step"):
            m.set_train_step(int(state.get("train_step", 0)))


def pads_exactly(model: Decoder) -> bool:
    """Whether a left-padded batch gives every row what it gives alone when run at once: every
    mixer takes the padding mask, and no module keys on absolute positions (a stochastic
    activation in its `stochastic` mode, whose masks hash the position)."""
    if not all(getattr(block.mixer, "takes_pad_mask", False) for block in model.blocks):
        return False
    return not any(getattr(m, "takes_context", False) and callable(getattr(m, "mode", None))
                   and m.mode() == "stochastic" for m in model.modules())


class AblateCache:
    """What `generate` carries between steps: the decoder's DecodeCache for the whole batch, or
    one per row when rows run unpadded. `seen` counts the columns consumed (padding included),
    which is what transformers slices new inputs by."""

    # what transformers' generate reads on a cache: never compiled, cropped or rolled back; not
    # "linear", so a cache handed back to `generate` has its new inputs sliced by get_seq_length()
    is_compileable = False
    is_croppable = False
    is_linear = (False,)

    def __init__(self) -> None:
        self.batch: Any = None
        self.rows: list | None = None
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


@dataclass
class AblateCausalLMOutput(HFModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: AblateCache | None = None


class AblateForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = AblateConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _is_stateful = True              # no assisted decoding: the cache cannot be rolled back

    def __init__(self, config: AblateConfig):
        super().__init__(config)
        if not config.ablate:
            raise ValueError("AblateConfig.ablate is empty: it must hold the run's resolved `model:` section "
                             "(written by `ablate export-hf`)")
        self.model = Decoder(model_config(copy.deepcopy(config.ablate)))
        apply_schedule_state(self.model, config.schedule or {})
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False                 # forward builds its own AblateCache

    def _init_weights(self, module: nn.Module) -> None:
        """Weights come from the checkpoint (or the decoder's own init); only the RoPE tables,
        non-persistent buffers left empty by a meta-device build, are rebuilt here."""
        if isinstance(module, RotaryEmbedding):
            module.reset(device=module.cos.device)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.head          # None: tied to the input embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: AblateCache | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> AblateCausalLMOutput | tuple:
        """attention_mask: (B, cached + T), 1 at real tokens (left padding). labels: as in
        transformers, unshifted (-100: ignored). use_cache: return an AblateCache (generate sets it)."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("AblateForCausalLM takes input_ids, not inputs_embeds")
        if use_cache and cache is None:
            cache = AblateCache()
        seen = cache.seen if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != seen + input_ids.shape[1]:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions; it must cover the "
                             f"{seen} cached and the {input_ids.shape[1]} new ones")
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        if cache is not None and cache.rows is not None:
            logits = self._rows(input_ids, mask, cache)
        elif mask is None:
            logits = self._batch(input_ids, None, cache)
        elif pads_exactly(self.model):
            logits = self._batch(input_ids, mask, cache)
        else:
            logits = self._rows(input_ids, mask, cache)
        if cache is not None:
            cache.seen += input_ids.shape[1]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if return_dict is False:
            return tuple(v for v in (loss, logits, cache) if v is not None)
        return AblateCausalLMOutput(loss=loss, logits=logits, cache=cache)

    def _batch(self, ids: torch.Tensor, mask: torch.Tensor | None, cache: AblateCache | None) -> torch.Tensor:
        if cache is not None and cache.batch is None:
            cache.batch = self.model.new_cache()
        return self.model(ids, cache=cache.batch if cache is not None else None, pad_mask=mask).logits

    def _rows(self, ids: torch.Tensor, mask: torch.Tensor | None, cache: AblateCache | None) -> torch.Tensor:
        """Each row's real tokens alone (with its own decode cache), re-padded; padding positions
        get zero logits."""
        B, T = ids.shape
        real = mask[:, -T:] if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        if cache is not None and cache.rows is None:
            if cache.batch is not None:
                raise ValueError("attention_mask: padding after unpadded steps; pad on the left, in the first call")
            cache.rows = [self.model.new_cache() for _ in range(B)]
        logits = None
        for i in range(B):
            if not bool(real[i].any()):
                continue
            row = self.model(ids[i, real[i]][None], cache=cache.rows[i] if cache is not None else None).logits[0]
            if logits is None:
                logits = row.new_zeros(B, T, row.shape[-1])
            logits[i, real[i]] = row
        if logits is None:
            logits = torch.zeros(B, T, self.config.vocab_size, device=ids.device)
        return logits


AutoConfig.register("ablate", AblateConfig, exist_ok=True)
AutoModelForCausalLM.register(AblateConfig, AblateForCausalLM, exist_ok=True)
