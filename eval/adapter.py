"""lm-eval model adapter over our `Decoder` and the run's tokenizer.

A `TemplateLM` subclass rather than a transformers wrapper: every architecture option only has
to keep `forward(input_ids, cache=None)` returning logits (and the cache) for evaluation to work.

- loglikelihood: one forward over context + continuation, left-truncated to max_length + 1
  tokens exactly as lm-eval's HFLM does, right-padded batches sorted by length (causal, so the
  padding never changes the scored positions).
- loglikelihood_rolling: lm-eval's disjoint rolling windows, scored through the same path.
- generate_until: greedy decoding through the decoding cache. Rows of a batch with different
  prompt lengths advance in lockstep (a row still reading its prompt is fed its next prompt
  token), so no attention mask or left padding is needed and any causal mixer with a cache
  works unchanged.

Distributed (FSDP2 / DDP): evaluation is replicated, not sharded. Every rank builds the same
requests and runs the same forwards in the same order; the only data-dependent control flow
(when generation stops) is agreed across ranks with an all-reduce. So FSDP2's per-forward
collectives always line up. lm-eval sees a single process (rank 0, world size 1).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn

from train.runtime import any_rank, autocast, unwrap

log = logging.getLogger(__name__)


def _distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AblateLM(TemplateLM):
    """lm-eval's view of one of our models. `tokenizer` is the run's HF fast tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 16, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos: bool = True, amp: bool = True, sync: bool | None = None):
        super().__init__()
        self.model = unwrap(model)
        self.tokenizer = tokenizer
        self._batch_size = int(batch_size)
        self._max_length = int(max_length or self.model.cfg.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        # Every training document is preceded by EOS, so EOS doubles as BOS (HFLM add_bos_token=True).
        self.add_bos = add_bos
        self._bos_text = tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_token_id
        self.amp = amp
        p = next(self.model.parameters())
        self._device = getattr(p, "device", torch.device("cpu"))   # a DTensor's is the local device
        self.sync = _distributed() if sync is None else sync
        self._warned_sampling = False

    # ------------------------------------------------------------------ lm-eval properties
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "ablate")).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "max_length": self.max_length}

    # ------------------------------------------------------------------ tokenization
    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        ids = list(self.tokenizer.encode(string, add_special_tokens=False))
        if add_special_tokens is not False and self.add_bos and not string.startswith(self._bos_text):
            ids = [self.eot_token_id] + ids
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ model calls
    def _autocast(self):
        return autocast(self.device, enabled=self.amp)

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        with self._autocast():
            out = self.model(ids.to(self.device), cache=cache)
        return out.logits, out.cache

    def _agree_any(self, flag: bool) -> bool:
        """True if `flag` is true on any rank (identical on all ranks: keeps loops in lockstep)."""
        return any_rank(flag) if self.sync else flag

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)      # no per-call tokenizing bar

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy decode) per request."""
        def sort_key(req: tuple[Any, list[int], list[int]]) -> tuple[int, tuple[int, ...]]:
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        pieces, owners = self._split_long(requests)
        if len(pieces) > len(requests):               # a continuation longer than max_length
            scores = self._loglikelihood_tokens(pieces)
            out = [(0.0, True)] * len(requests)
            for i, (ll, greedy) in zip(owners, scores):
                out[i] = (out[i][0] + ll, out[i][1] and greedy)
            for (key, _, _), answer in zip(requests, out):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return out
        re_ord = Collator(requests, sort_fn=sort_key)
        res: list[tuple[float, bool]] = []
        for chunk in re_ord.get_batched(n=self.batch_size):
            inps, conts = [], []
            for _, ctx, cont in chunk:
                assert len(ctx) > 0 and len(cont) > 0
                inps.append((ctx + cont)[-(self.max_length + 1):][:-1])
                conts.append(cont)
            width = max(len(x) for x in inps)
            batch = torch.full((len(inps), width), self._pad_id, dtype=torch.long)
            for i, x in enumerate(inps):
                batch[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            logits, _ = self._forward(batch)
            for (key, _, _), x, cont, row in zip(chunk, inps, conts, logits):
                n = len(x)
                logp = F.log_softmax(row[n - len(cont):n].float(), dim=-1)
                target = torch.tensor(cont, dtype=torch.long, device=logp.device)
                answer = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
                res.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return re_ord.get_original(res)

    def _split_long(self, requests: list[tuple[Any, list[int], list[int]]]
                    ) -> tuple[list[tuple[Any, list[int], list[int]]], list[int]]:
        """Continuations longer than max_length (HFLM refuses them) as pieces of at most
        max_length tokens, each scored with as much preceding context as fits."""
        pieces, owners = [], []
        for i, (key, ctx, cont) in enumerate(requests):
            if len(cont) <= self.max_length:
                pieces.append((key, ctx, cont))
                owners.append(i)
                continue
            for a in range(0, len(cont), self.max_length):
                pieces.append((None, (ctx + cont[:a])[-self.max_length:], cont[a:a + self.max_length]))
                owners.append(i)
        return pieces, owners

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: each token scored once, with up to max_length context."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for i, (string,) in enumerate(req.args for req in requests):
            toks = self.tok_encode(string, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=toks, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows) if windows else []
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owners, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until a stop string, EOS or max_gen_toks tokens."""
        re_ord = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                          group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        res: list[str] = []
        for chunk in re_ord.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            if kwargs.get("do_sample") and not self._warned_sampling:
                log.warning("generate_until: sampling requested (%s); ablate's adapter decodes greedily", kwargs)
                self._warned_sampling = True
            max_gen = min(int(kwargs["max_gen_toks"]), self.max_length - 1)
            if max_gen < int(kwargs["max_gen_toks"]):
                log.warning("generate_until: max_gen_toks=%s capped at %d (model max length %d)",
                            kwargs["max_gen_toks"], max_gen, self.max_length)
            prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_gen) for c in contexts]
            outs = self.greedy(prompts, max_gen, until)
            for context, gen_kwargs, toks in zip(contexts, all_kwargs, outs):
                text = postprocess_generated_text(self.tok_decode(toks), until, None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return re_ord.get_original(res)

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new: int, until: list[str] | None = None) -> list[list[int]]:
        """Greedy token ids after each prompt (EOS excluded), through the decoding cache.

        Prefill the shortest prompt length for all rows at once, then one position per forward;
        a row still inside its prompt is fed its next prompt token, the others their last
        prediction. Positions stay equal across rows, so no mask or padding is needed.
        """
        max_new = min(max_new, self.max_length - 1)
        prompts = [p[-(self.max_length - max_new):] for p in prompts]     # positions must fit max_length
        lens = [len(p) for p in prompts]
        assert min(lens) > 0, "empty prompt"
        width = max(lens)
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        stops = [s for s in (until or []) if s]
        gens: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        t = min(lens)
        logits, cache = self._forward(ids[:, :t], cache=self.model.new_cache())
        while True:
            pred = logits[:, -1].float().argmax(dim=-1).cpu()
            feed = ids[:, t].clone() if t < width else torch.empty(len(prompts), dtype=torch.long)
            for i in range(len(prompts)):
                if t < lens[i]:
                    continue                      # still reading the prompt: feed[i] is its token
                tok = int(pred[i])
                feed[i] = tok
                if done[i]:
                    continue
                if tok == self.eot_token_id:
                    done[i] = True
                    continue
                gens[i].append(tok)
                if len(gens[i]) >= max_new or (stops and any(s in self.tok_decode(gens[i]) for s in stops)):
                    done[i] = True
            t += 1
            if not self._agree_any(not all(done)) or t >= self.max_length:
                return gens
            logits, cache = self._forward(feed[:, None], cache=cache)
