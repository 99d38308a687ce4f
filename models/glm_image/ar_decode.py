"""GLM-Image's AR sampling at memory-bandwidth speed on one GPU: a static KV cache and one compiled decode step.

    generate(model, inputs, **generate_kwargs)   # == model.generate(**inputs, **generate_kwargs), faster on CUDA

Sampling semantics are generate()'s own, because generate() still does everything but the token loop: it merges the
model's generation config with the call's arguments (temperature, top-k, top-p, ... exactly as the pipeline leaves
them), prepares special tokens, the attention mask, the condition images' encoder outputs, the logits processors and
the stopping criteria (the AR stage's per-token progress and cancel among them), and runs the prefill. Only its
decoding method (`_sample`) is replaced, through generate's `custom_generate` hook, by `FastDecoder._decode`, which
selects tokens with the same operations in the same order (last logits -> float32 -> processors -> softmax ->
multinomial, or argmax; pad after eos; stopping criteria after every token), so a seed draws the same random numbers
and greedy decoding picks the same argmax as generate() would from the same logits.

What makes it fast:
- A `StaticCache` (fixed addresses, so the step can be a CUDA graph), reused across prompts: allocated per (batch,
  cache length rounded up to CACHE_BUCKET) and reset, never reallocated for a prompt that fits.
- The one-token decode step (decode_step.py: the text decoder + lm_head, q/k/v fused, packed GQA attention) compiled
  once per worker (`torch.compile`, mode "reduce-overhead": inductor kernels replayed as a CUDA graph; re-traced
  only for a new cache slot). It takes GLM-Image's 3D decode positions as an input tensor, read from the table
  get_rope_index builds at prefill, exactly as GlmImageModel.compute_3d_position_ids slices it; calling the text
  decoder directly avoids that function's data-dependent slice (a graph break at Tensor.item() under torch.compile).
- No host-device synchronisation per token: "all sequences finished" is copied to the host asynchronously and read
  after the next step has been queued, so the GPU always has the next decode step in its queue (like transformers'
  DeferredStopCheck, without undoing anything: a stop only discards a queued forward, no token, no random draw);
  generate()'s processors that would synchronise (suppressed tokens) run as exact equivalents that do not
  (logits_processors.py).

Tensor parallel (plan.apply_ar_tensor_parallel has sharded the decoder over a group): every rank runs this loop in
step, its reductions inside the compiled step, and after each sampling rank 0's tokens are broadcast on the device,
so rank 0 alone decides what is sampled and every rank feeds the same token to the next step.

warm_up() compiles and captures the decode step for a request shape before the first request (the AR stage does it
at load, so no prompt pays for compilation). On CPU the AR stage keeps plain generate() on one rank and this loop
eager when tensor-parallel; tests run it there with compile=False.
"""
from __future__ import annotations

import functools
import logging
import warnings

import torch
import torch.nn.functional as F
from transformers import StaticCache

from .. import internals
from .decode_step import decode_step, fuse_qkv
from .logits_processors import without_host_syncs

log = logging.getLogger(__name__)

CACHE_BUCKET = 1024  # static cache lengths are multiples of this: few distinct shapes, hence few compilations
PROBATION_STEPS = 3  # compiled steps that must have run (trace, CUDA-graph warm-up, capture, replay) before a failure
#                      of the compiled step counts as an error rather than as a reason to decode eagerly
TP_GROUP = "ar"  # the group plan.apply_ar_tensor_parallel shards over (model.load makes it: ranks 0..n-1)
_ATTR = "_parallel_diffusion_fast_ar"  # where decoder_for() keeps a model's decoder: compiled once per worker


def enabled(model, comm=None) -> bool:
    """Whether the AR takes the fast path: on CUDA, and wherever it is tensor-parallel (`comm` given: only this
    loop broadcasts rank 0's tokens); a single CPU process keeps plain generate(), and so does CUDA where the
    installed transformers is not one this loop was checked against (internals.FAST_AR warns why)."""
    if comm is not None:
        return True  # model.ar_placement shards the AR only where FAST_AR is available
    return model.device.type == "cuda" and internals.FAST_AR.available()


def generate(model, inputs, comm=None, **kwargs) -> torch.LongTensor:
    """`model.generate(**inputs, **kwargs)`: through the model's FastDecoder where enabled(), else plain. `comm`:
    the model is tensor-parallel over its TP_GROUP (plan.apply_ar_tensor_parallel)."""
    if not enabled(model, comm):
        return model.generate(**inputs, **kwargs)
    return decoder_for(model, comm).generate(inputs, **kwargs)


def decoder_for(model, comm=None, **options) -> "FastDecoder":
    """The model's FastDecoder, created on first use and kept on the model: compiled once per worker process."""
    decoder = model.__dict__.get(_ATTR)
    if decoder is None:
        decoder = FastDecoder(model, comm=comm, **options)
        model.__dict__[_ATTR] = decoder  # a plain attribute: not a submodule, not in the state dict
    return decoder


class _CompileFailed(RuntimeError):
    pass


class _Slot:
    """A static KV cache and the decode step's input buffers, for one (batch, cache length)."""

    def __init__(self, model, batch: int, length: int, device: torch.device, static: bool):
        self.batch, self.length = batch, length
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, batch, 1, dtype=torch.long, device=device)
        self.mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if static:  # fixed addresses: the CUDA graph reads them in place
            for t in (self.ids, self.positions, self.mask):
                torch._dynamo.mark_static_address(t)
        # None: on probation (a compiler or CUDA-graph failure is caught and the request redone eagerly) until a
        # request ran PROBATION_STEPS compiled steps; True: proven; False: failed once, eager from now on
        self.compiled: bool | None = None
        self.compiled_steps = 0


class _DecodePositions:
    """GLM-Image's 3D position ids for the token fed at decode step, as GlmImageModel.compute_3d_position_ids
    computes them during generate(): the per-sample decode table get_rope_index stored at prefill, sliced at
    (tokens in the cache - prefill length); plain positions when there is none."""

    def __init__(self, model):
        inner = model.model
        table = inner._cached_decode_position_ids if inner.rope_deltas is not None else None
        self.table = None if table is None else table.permute(2, 1, 0).contiguous()  # (steps, 3, B)
        self.prefill = inner._prefill_len

    def fill(self, out: torch.Tensor, past: int) -> None:
        if self.table is None:
            out.fill_(past)
            return
        step = past - self.prefill
        if not 0 <= step < self.table.shape[0]:
            raise RuntimeError(f"GLM-Image has decode positions for {self.table.shape[0]} tokens, not for token "
                               f"{step + 1}: ask for at most as many new tokens as the image grids hold (+1)")
        out.copy_(self.table[step].unsqueeze(-1))


class _StopFlag:
    """"Every sequence has finished", read on the host one decode step late: the device never waits for the host."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.host = torch.zeros((), dtype=torch.bool, pin_memory=True)
            self.event = torch.cuda.Event()
        self.value = False

    def record(self, unfinished: torch.Tensor) -> None:
        done = unfinished.max() == 0
        if self.cuda:
            self.host.copy_(done, non_blocking=True)
            self.event.record()
        else:
            self.value = bool(done)

    def read(self) -> bool:
        if self.cuda:
            self.event.synchronize()
            return bool(self.host)
        return self.value


class FastDecoder:
    """generate() with a static KV cache and a compiled one-token decode step (see the module docstring).

    compile: None = on CUDA only. backend/mode/fullgraph go to torch.compile (mode only with inductor on CUDA, where
    "reduce-overhead" means CUDA graphs). A compiled step that fails during a cache slot's first request (tracing,
    compiling, CUDA-graph capture) makes the decoder warn, restore the random state and redo that request (and that
    slot from then on) eagerly, so a compiler problem costs speed, never a result. Tensor-parallel (`comm`), such a
    failure is raised instead: a rank that alone went eager would leave the others waiting in a collective."""

    def __init__(self, model, comm=None, compile: bool | None = None, backend: str = "inductor",
                 mode: str | None = "reduce-overhead", fullgraph: bool = False):
        self.model = model
        fuse_qkv(model)  # after any tensor-parallel plan: it fuses the shards this rank holds
        self.comm = comm if comm is not None and comm.group_size(TP_GROUP) > 1 else None
        self.compile = model.device.type == "cuda" if compile is None else compile
        options = {"fullgraph": fullgraph, "dynamic": False}
        if backend == "inductor" and mode and model.device.type == "cuda":
            options["mode"] = mode
        self._compiled = torch.compile(self._forward, backend=backend, **options) if self.compile else None
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.compile_errors: list[str] = []

    # -- the decode step ---------------------------------------------------------------------------------------

    def _forward(self, input_ids, position_ids, attention_mask, cache):
        return decode_step(self.model, input_ids, position_ids, attention_mask, cache)

    def _step(self, slot: _Slot, tokens: torch.Tensor, positions: _DecodePositions, past: int) -> torch.Tensor:
        slot.ids.copy_(tokens[:, None])
        positions.fill(slot.positions, past)
        args = (slot.ids, slot.positions, slot.mask, slot.cache)
        if self._compiled is None or slot.compiled is False:
            return self._forward(*args)
        if slot.ids.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits have been consumed
        if slot.compiled:
            return self._compiled(*args)
        try:
            logits = self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any failure on probation: redo this request eagerly (generate())
            raise _CompileFailed(f"{type(exc).__name__}: {exc}") from exc
        slot.compiled_steps += 1
        return logits

    def _slot(self, batch: int, needed: int, device: torch.device) -> _Slot:
        fitting = [s for s in self.slots.values() if s.batch == batch and s.length >= needed]
        if fitting:
            return min(fitting, key=lambda s: s.length)
        length = -(-needed // CACHE_BUCKET) * CACHE_BUCKET
        slot = _Slot(self.model, batch, length, device, static=self._compiled is not None)
        self.slots[(batch, length)] = slot
        return slot

    # -- generate ----------------------------------------------------------------------------------------------

    def supports(self, kwargs: dict) -> bool:
        """Plain sampling or greedy search, one sequence per prompt, token ids out: what the AR stage asks for."""
        config = kwargs.get("generation_config") or self.model.generation_config
        get = lambda k, default=None: kwargs.get(k, getattr(config, k, default))  # noqa: E731
        return (get("num_beams", 1) in (None, 1) and get("num_return_sequences", 1) in (None, 1)
                and not get("return_dict_in_generate", False) and get("prefill_chunk_size") is None
                and kwargs.get("assistant_model") is None and kwargs.get("streamer") is None
                and get("use_cache", True) is not False and "past_key_values" not in kwargs
                and "custom_generate" not in kwargs and hasattr(self.model, "_prefill"))

    def generate(self, inputs, **kwargs) -> torch.LongTensor:
        """model.generate(**inputs, **kwargs) with the fast decoding loop (plain generate() for what it does not
        support). `max_new_tokens` is required: it sizes the static cache."""
        if not self.supports(kwargs):
            if self.comm is not None:
                raise ValueError(f"tensor-parallel AR supports plain sampling and greedy search, not {kwargs}")
            return self.model.generate(**inputs, **kwargs)
        if kwargs.get("max_new_tokens") is None:
            raise ValueError("FastDecoder.generate needs max_new_tokens")
        input_ids = inputs["input_ids"]
        slot = self._slot(input_ids.shape[0], input_ids.shape[1] + kwargs["max_new_tokens"], input_ids.device)
        return self._run(inputs, slot, kwargs)

    def warm_up(self, inputs, max_new_tokens: int) -> None:
        """Compile and capture the decode step for requests like `inputs` asking for `max_new_tokens` (their cache
        slot), decoding a few greedy tokens: the compile cost is paid here, once per worker, not by a prompt."""
        if self._compiled is None:
            return
        input_ids = inputs["input_ids"]
        slot = self._slot(input_ids.shape[0], input_ids.shape[1] + max_new_tokens, input_ids.device)
        if slot.compiled is None:
            self._run(inputs, slot, {"max_new_tokens": PROBATION_STEPS + 1, "do_sample": False})

    def _run(self, inputs, slot: _Slot, kwargs: dict) -> torch.LongTensor:
        input_ids = inputs["input_ids"]
        rng = None
        if self._compiled is not None and slot.compiled is None and self.comm is None:
            rng = _rng_state(input_ids.device)  # the compiled step may fail: be ready to redo the request eagerly
        try:
            out = self._generate(inputs, slot, kwargs)
            if slot.compiled is None and slot.compiled_steps >= PROBATION_STEPS:
                slot.compiled = True
            return out
        except _CompileFailed as exc:
            if rng is None:
                raise
            slot.compiled = False
            self.compile_errors.append(str(exc))
            warnings.warn(f"GLM-Image AR: the compiled decode step failed ({exc}); decoding eagerly instead "
                          f"(same tokens, slower)", RuntimeWarning, stacklevel=2)
            _set_rng_state(input_ids.device, rng)
            return self._generate(inputs, slot, kwargs)

    def _generate(self, inputs, slot: _Slot, kwargs: dict) -> torch.LongTensor:
        slot.cache.reset()
        # cache_implementation=None: a checkpoint's own choice would conflict with the cache passed here
        return self.model.generate(**inputs, **{**kwargs, "cache_implementation": None}, past_key_values=slot.cache,
                                   custom_generate=functools.partial(self._decode, slot=slot))

    @torch.no_grad()
    def _decode(self, model, input_ids, logits_processor, stopping_criteria, generation_config, *, slot: _Slot,
                **model_kwargs) -> torch.LongTensor:
        """GenerationMixin._sample's loop (transformers 5.23), token for token, around the fast decode step."""
        device = input_ids.device
        pad_token_id = generation_config._pad_token_tensor
        if pad_token_id is not None:
            pad_token_id = pad_token_id.to(device)
        has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        do_sample = generation_config.do_sample
        max_length = generation_config.max_length
        unfinished_sequences = torch.ones(input_ids.shape[0], dtype=torch.long, device=device)
        logits_processor = without_host_syncs(logits_processor)  # equal scores; the host stays a step ahead

        outputs = model._prefill(input_ids, generation_config, model_kwargs)  # generate()'s own prefill
        logits = outputs.logits
        del outputs
        positions = _DecodePositions(model)  # built by the prefill
        mask = model_kwargs.get("attention_mask")  # None when generate() found no padding
        slot.mask.fill_(1)  # positions after the prompt: all attended to (the causal mask hides the future)
        if mask is not None:
            slot.mask[:, :mask.shape[1]].copy_(mask)
        stop = _StopFlag(device)

        while True:
            next_token_logits = logits[:, -1].to(copy=True, dtype=torch.float32, device=device)
            next_token_scores = logits_processor(input_ids, next_token_logits)
            if do_sample:
                probs = F.softmax(next_token_scores, dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(next_token_scores, dim=-1)
            if self.comm is not None:  # rank 0 decides: every rank continues with its tokens
                next_tokens = self.comm.broadcast(next_tokens, TP_GROUP)
            if has_eos_stopping_criteria:
                next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            unfinished_sequences = unfinished_sequences & ~stopping_criteria(input_ids, None)
            if max_length is not None and input_ids.shape[1] >= max_length:
                break  # MaxLengthCriteria has just finished every sequence: known on the host, no forward needed
            stop.record(unfinished_sequences)
            logits = self._step(slot, next_tokens, positions, past=input_ids.shape[1] - 1)
            if stop.read():  # generate() would have stopped before that forward: drop it, no token was drawn
                break
        return input_ids


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
