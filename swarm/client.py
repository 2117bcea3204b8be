"""DistributedModelForCausalLM: embeddings, final norm and LM head here; the blocks in the swarm."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from transformers import GenerationConfig
from transformers.modeling_outputs import CausalLMOutput

from swarm.config import ClientConfig
from swarm.drafting import DEFAULT_MAX_NGRAM
from swarm.generation import DecodeStats, Rewind, SamplingConfig, Stopping, Streamer, decode
from swarm.head import ClientHead
from swarm.errors import ConfigError
from swarm.hooks import ClientContext, Coverage, TrustLayer, TrustLayerFactory
from swarm.head_batching import BatchedLogits
from swarm.local_blocks import LocalBlocks
from swarm.loop import BackgroundLoop
from swarm.models import BlockCheckpoint, open_model
from swarm.network import create_client_dht, load_identity, split_multiaddrs
from swarm.plugins import default_trust_layer
from swarm.remote import HivemindTransport
from swarm.sequence import DhtSpanSource, RemoteSequence
from swarm.session import InferenceSession, StepOutput
from swarm.speculative import decode_speculative
from swarm.stateless import run_route
from swarm.training import RemoteBlocks, RemoteBlocksFunction
from swarm.tuning import PromptTuning

logger = logging.getLogger(__name__)


def rewind_point(untrusted_from: int, start: int, prompt_length: int) -> tuple[int, int]:
    """Where to go on after outputs from session position `untrusted_from` on proved untrustworthy, in a
    generation whose prompt was sent at position `start`: (tokens of the sequence to keep, prompt
    included; the session position to roll back to). The token at `keep - 1` is sent again from there,
    or the whole prompt if nothing generated is kept."""
    if untrusted_from < start + prompt_length:
        return prompt_length, start
    # steps after the prompt's run at start + prompt_length, + 1, ...; the one at p sent token p - start
    return untrusted_from - start + 1, untrusted_from


async def _call(function):
    """`function()` on the client's loop (the trust layer's state lives there)."""
    return function()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's logits against the next label (-100: ignored)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)


def _sampled_embeddings(checkpoint: BlockCheckpoint, count: int, seed: int = 0) -> torch.Tensor:
    """Embeddings of `count` vocabulary tokens drawn at random: where prompt tuning usually starts."""
    embeddings = checkpoint.load_client_state()["embed_tokens.weight"].float()
    ids = torch.randint(0, embeddings.shape[0], (count,), generator=torch.Generator().manual_seed(seed))
    return embeddings[ids].clone()


def _rewind_if_untrusted(session: "SyncSession", untrusted: int | None, start: int, prompt_length: int) -> None:
    """Raise `Rewind` (after rolling the session back) if outputs from position `untrusted` on passed through
    a peer since blacklisted, in a generation that began at `start`."""
    if untrusted is None:
        return
    keep, resume = rewind_point(untrusted, start, prompt_length)
    session.rollback(resume)
    logger.warning(f"Regenerating from token {keep - prompt_length}: a peer on the route was caught cheating or "
                   f"contradicted by others")
    raise Rewind(keep, "a peer on the route was blacklisted or contradicted")


@dataclass(frozen=True)
class GenerationReport:
    """What a `generate` call knows of its answer beyond the tokens: how much of it spot checks verified.

    `verification` counts the answer's hop-steps (each hop's reply to each step that went into it) by how
    far their checks got, once the answer waited for them (unless `settle_checks` was off). An answer is
    `flagged` when it is not fully verified: some step was not checked, could not be, failed, or is still
    being checked. Without a trust layer nothing is verified. `decoding` counts the steps through the route
    (round trips) and the tokens they brought (more than one each with `prompt_lookup_num_tokens`).
    """

    verification: Coverage
    checked: bool  # a trust layer was on
    rewinds: int = 0  # times part of the answer was dropped and written again (a peer on its route was caught)
    decoding: DecodeStats = field(default_factory=DecodeStats)

    @property
    def steps(self) -> int:
        return self.verification.steps

    @property
    def verified(self) -> int:
        return self.verification.verified

    @property
    def coverage(self) -> float:
        """The share of the answer's hop-steps that were checked and passed."""
        return self.verification.coverage

    @property
    def flagged(self) -> bool:
        return self.coverage < 1.0

    def mark(self) -> str | None:
        """One line to show under a flagged answer; None when it is fully verified."""
        if not self.flagged:
            return None
        if not self.checked:
            return f"[verified 0 of {self.steps} steps: spot checks are off]"
        failed = f", {self.verification.failed} failed" if self.verification.failed else ""
        return f"[verified {self.verified} of {self.steps} steps{failed}: not fully verified]"


@dataclass(frozen=True)
class GenerateOutput:
    """`generate(..., return_dict_in_generate=True)`: the token ids and the answer's report."""

    sequences: torch.LongTensor
    report: GenerationReport


class SyncSession:
    """A blocking handle on an `InferenceSession`, for use from ordinary (non-async) code.

    With a `prefix` (soft prompts, (length, hidden)), the session's first step sends it before the tokens, and
    positions seen from here leave it out: position 0 is the first token after it, a rollback keeps it. With
    `deep_prompts` too (num_blocks, length, hidden), the peers add them at each block's input over the prefix."""

    def __init__(self, model: "DistributedModelForCausalLM", max_length: int, prefix: torch.Tensor | None = None,
                 deep_prompts: torch.Tensor | None = None):
        self.model = model
        self.prefix = prefix
        self.offset = 0 if prefix is None else prefix.shape[0]
        layer = model.trust_layer
        observer, verifier = (None, None) if layer is None else (layer.observer, layer.verifier)
        self.inner = InferenceSession(model.sequence, model.transport, max_length + self.offset, observer, verifier,
                                      push=model.sequence.cfg.push, deep_prompts=deep_prompts)

    @property
    def position(self) -> int:
        return max(self.inner.position - self.offset, 0)

    @property
    def route(self):
        return self.inner.route

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, position: int | None = None):
        """The last hop's output and where untrusted outputs begin (`swarm.session.StepOutput`)."""
        prepend = self.prefix is not None and self.inner.position < self.offset  # the prefix is not on the peers
        inner_position = 0 if prepend else (None if position is None else position + self.offset)
        outer = self.position if position is None else position
        if self.offset and attention_mask is not None and attention_mask.shape[1] == outer + hidden.shape[1]:
            # a mask of the whole sequence (not of the new tokens alone): the prefix's part goes first
            attention_mask = torch.cat([torch.ones(attention_mask.shape[0], self.offset, dtype=attention_mask.dtype),
                                        attention_mask], dim=1)
        if prepend:
            hidden = torch.cat([self.prefix.to(hidden.dtype)[None].expand(hidden.shape[0], -1, -1), hidden], dim=1)
        output = self.model.loop.run(self.inner.step(hidden, attention_mask, inner_position))
        if not self.offset:
            return output
        return StepOutput(output.hidden[:, self.offset:] if prepend else output.hidden,
                          self._outer(output.untrusted_from))

    def _outer(self, position: int | None) -> int | None:
        return None if position is None else max(position - self.offset, 0)

    def settle(self) -> int | None:
        """Wait for the spot checks of the steps so far; from where outputs are untrusted (None: nowhere)."""
        return self._outer(self.model.loop.run(self.inner.settle()))

    def rollback(self, position: int) -> None:
        self.inner.rollback(min(position + self.offset, self.inner.position) if self.inner.position else position)

    def close(self) -> None:
        self.model.batched_logits.forget(self)
        self.model.loop.run(self.inner.close())

    def __enter__(self) -> "SyncSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DistributedModelForCausalLM:
    """A causal LM whose transformer blocks run on swarm peers.

    >>> model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=[maddr])
    >>> model.generate(input_ids, max_new_tokens=32)
    """

    def __init__(self, checkpoint: BlockCheckpoint, cfg: ClientConfig, dtype: torch.dtype = torch.float32,
                 trust_layer: TrustLayerFactory | None = None, tuning: PromptTuning | None = None):
        self.checkpoint = checkpoint
        self.config = checkpoint.load_config()
        self.tokenizer = checkpoint.load_tokenizer()
        self.dtype = dtype
        self.head = ClientHead(checkpoint, self.config, dtype)
        self.batched_logits = BatchedLogits(self.head.logits)  # concurrent sessions' logits in one pass of the head
        self.eos_token_ids = self._default_eos_ids()
        self.loop = BackgroundLoop()
        self.identity = load_identity(cfg.identity)
        self.dht = create_client_dht(cfg.initial_peers, checkpoint.dht_prefix, checkpoint.num_blocks, self.identity)
        self.p2p = self.loop.run(self.dht.replicate_p2p())
        self.transport = HivemindTransport(self.p2p, bundle_steps=cfg.bundle_steps)
        source = DhtSpanSource(self.dht, checkpoint.dht_prefix, checkpoint.num_blocks)
        self.sequence = RemoteSequence(source, self.transport, checkpoint.manifest.name, checkpoint.num_blocks, cfg)
        self.transport.relays_of = self.sequence.relays_of  # peers behind NAT are reached through their relays
        self.trust_layer: TrustLayer | None = None  # receipt checks, spot checks and the blacklist, when on
        self.tuning = tuning  # trainable prompts (swarm.tuning), or None
        self.last_generation: GenerationReport | None = None  # the report of the last `generate` (any thread)
        if cfg.spot_checks:
            factory = trust_layer or default_trust_layer()
            if factory is not None:
                context = ClientContext(self.transport, self.sequence, self.identity, self.p2p, self.dht, cfg,
                                        logits=self.head.logits, num_blocks=checkpoint.num_blocks,
                                        local_blocks=self._local_blocks(cfg.self_verify_bytes))
                self.trust_layer = factory(context)
                self.sequence.use_trust(self.trust_layer.trust)
                self.loop.run(self.trust_layer.start())
        training = None if self.trust_layer is None else getattr(self.trust_layer, "training", None)
        self.remote_blocks = RemoteBlocks(self.sequence, self.transport, timeout=cfg.request_timeout, observer=training)
        self.micro_batches = cfg.train_micro_batches  # a training batch goes through the peers in this many parts

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        initial_peers: Sequence[str] = (),
        *,
        dtype: torch.dtype = torch.float32,
        cache_dir: Path | None = None,
        trust_layer: TrustLayerFactory | None = None,
        tuning: str | None = None,
        prompt_length: int = 16,
        prompts: str | Path | None = None,
        **client_options,
    ) -> "DistributedModelForCausalLM":
        """Open `model` (alias, repo id or path) and join the swarm through `initial_peers`.

        `client_options` are fields of `swarm.config.ClientConfig` (e.g. `missing_blocks_timeout=60`).
        `trust_layer` builds the spot checker and blacklist (default: the installed one, `swarm.plugins`).
        `tuning` ("prompt" or "deep_prompt") adds `prompt_length` new trainable prompts (`parameters()`);
        `prompts` loads saved ones (`save_prompts`) instead.
        """
        checkpoint = open_model(model, cache_dir=cache_dir)
        cfg = ClientConfig(initial_peers=tuple(split_multiaddrs(initial_peers)), **client_options)
        trainable = None
        if prompts is not None:
            trainable = PromptTuning.load(prompts)
            trainable.check_fits(checkpoint.load_config().hidden_size, checkpoint.num_blocks, f"the prompts in {prompts}")
        elif tuning is not None:
            config = checkpoint.load_config()
            trainable = PromptTuning(tuning, prompt_length, config.hidden_size, checkpoint.num_blocks,
                                     init=_sampled_embeddings(checkpoint, prompt_length))
        return cls(checkpoint, cfg, dtype, trust_layer, trainable)

    def _local_blocks(self, budget_bytes: int) -> LocalBlocks | None:
        """Blocks this client may load itself, on demand, to verify hops that no other peer serves."""
        if budget_bytes <= 0:
            return None
        stored = getattr(torch, self.checkpoint.manifest.torch_dtype, torch.float32)
        return LocalBlocks(self.config, self.checkpoint.load_block_state, self.checkpoint.block_nbytes, budget_bytes,
                           dtype=torch.float32, stored_dtype=stored)

    def _default_eos_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids from the model's generation config, else the tokenizer's."""
        try:
            eos = GenerationConfig.from_pretrained(self.checkpoint.path).eos_token_id
        except OSError:  # no generation_config.json in the cache
            eos = None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))

    def inference_session(self, max_length: int) -> SyncSession:
        """An inference session whose KV caches live on the peers; close it (or use `with`) when done. With soft
        prompts (`tuning`), they go before the session's first tokens; deep prompts, the peers add at each block."""
        tuning = self.tuning
        prefix = None if tuning is None else tuning.prompt_embeddings.detach().to(self.dtype)
        deep = None if tuning is None or not tuning.deep else tuning.deep_prompts.detach().to(self.dtype, copy=True)
        return SyncSession(self, max_length, prefix, deep)

    def next_logits(
        self, session: SyncSession, new_ids: torch.Tensor, attention_mask: torch.Tensor | None,
        start: int = 0, prompt_length: int | None = None,
    ):
        """Logits for the token after `new_ids`. Raises `Rewind` if a peer of the route was blacklisted and
        tokens generated since position `start` (where this call's prompt of `prompt_length` tokens began)
        went through it; the session is already rolled back then."""
        return self.step_logits(session, new_ids, attention_mask, start, prompt_length)[:, 0]  # (batch, vocab)

    def step_logits(
        self, session: SyncSession, new_ids: torch.Tensor, attention_mask: torch.Tensor | None,
        start: int = 0, prompt_length: int | None = None, last: int = 1,
    ) -> torch.Tensor:
        """`next_logits` for each of the `last` positions of `new_ids`, in one step: (batch, last, vocab)."""
        output = session.step(self.head.embed(new_ids), attention_mask)
        if prompt_length is not None:
            _rewind_if_untrusted(session, output.untrusted_from, start, prompt_length)
        return self.batched_logits(output.hidden[:, -last:], member=session)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Streamer | None = None,
        session: SyncSession | None = None,
        settle_checks: bool | None = None,
        stopping_criteria: Stopping | None = None,
        return_dict_in_generate: bool = False,
        prompt_lookup_num_tokens: int = 0,
        max_matching_ngram_size: int = DEFAULT_MAX_NGRAM,
    ) -> torch.LongTensor | GenerateOutput:
        """Like `transformers.GenerationMixin.generate`: returns (batch, prompt + new) token ids.

        With `session`, `input_ids` continue that session (only the new tokens are sent), so a chat
        keeps its history on the peers. `settle_checks` (default: the client's setting) waits for the
        answer's own spot checks before returning it, and regenerates what a peer they catch computed.
        `stopping_criteria(sequences, scores)` ends rows (or all) early, before the answer settles.
        How much of the answer was verified is in `last_generation` (a `GenerationReport`), or returned
        beside the ids with `return_dict_in_generate=True` (a `GenerateOutput`, for concurrent callers).

        `prompt_lookup_num_tokens` (transformers' name; 0: off) turns on speculative decoding: each step also
        sends up to that many tokens guessed by prompt lookup (what followed the latest earlier occurrence of the
        last `max_matching_ngram_size` tokens, or of fewer, but at least two: `swarm.drafting`) and keeps those the
        model confirms, so one round trip through the swarm may bring several tokens; the answer stays the same up
        to float rounding (`swarm.speculative`). One row only: a batch, or a padded prompt, is decoded normally
        (its rows share one KV-cache position on every peer). The report's `decoding` counts round trips and tokens.
        """
        self.last_generation = None
        if isinstance(input_ids, dict) or hasattr(input_ids, "input_ids"):  # a BatchEncoding
            attention_mask = input_ids.get("attention_mask", attention_mask)
            input_ids = input_ids["input_ids"]
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        eos = self.eos_token_ids if eos_token_id is None else (
            tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (eos_token_id,)
        )
        pad = pad_token_id if pad_token_id is not None else (self.tokenizer.pad_token_id or (eos[0] if eos else 0))
        cfg = SamplingConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            eos_token_ids=eos,
            pad_token_id=pad,
        )
        own_session = session is None
        if own_session:
            session = self.inference_session(max_length=input_ids.shape[1] + max_new_tokens)
        start, hop_steps, rewinds, stats = session.position, session.inner.hop_steps, [0], DecodeStats()
        next_logits, settle = self._decoding_hooks(session, input_ids.shape[1], settle_checks, rewinds)
        speculate = prompt_lookup_num_tokens > 0 and input_ids.shape[0] == 1 and attention_mask is None
        try:
            if speculate:
                verify = self._verify_hook(session, input_ids.shape[1], rewinds)
                sequences = decode_speculative(
                    verify, lambda kept: session.rollback(start + kept), input_ids, cfg, prompt_lookup_num_tokens,
                    max_matching_ngram_size, streamer, settle, stopping_criteria, stats,
                )
            else:
                sequences = decode(next_logits, input_ids, attention_mask, cfg, streamer, settle, stopping_criteria,
                                   stats)
            report = self._report(session, start, session.inner.hop_steps - hop_steps, rewinds[0], stats)
            self.last_generation = report
        finally:
            if own_session:
                session.close()
        return GenerateOutput(sequences, report) if return_dict_in_generate else sequences

    def _report(self, session: SyncSession, start: int, hop_steps: int, rewinds: int,
                decoding: DecodeStats) -> GenerationReport:
        """The verification of the answer whose steps began at session position `start`."""
        if self.trust_layer is None:
            return GenerationReport(Coverage(steps=hop_steps), checked=False, rewinds=rewinds, decoding=decoding)
        observer = self.trust_layer.observer
        coverage = self.loop.run(_call(lambda: observer.coverage(session.inner.session_id, since=start)))
        return GenerationReport(coverage, checked=True, rewinds=rewinds, decoding=decoding)

    def _verify_hook(self, session: SyncSession, prompt_length: int, rewinds: list[int]):
        """`decode_speculative`'s verify for this session: the logits of a step's last positions (`step_logits`);
        each rewind is counted in `rewinds[0]`."""
        start = session.position

        def verify(ids: torch.Tensor, last: int) -> torch.Tensor:
            try:
                return self.step_logits(session, ids, None, start, prompt_length, last)
            except Rewind:
                rewinds[0] += 1
                raise

        return verify

    def _decoding_hooks(self, session: SyncSession, prompt_length: int, settle_checks: bool | None,
                        rewinds: list[int] | None = None):
        """`decode`'s next_logits for this session, and its settle hook (None when answers do not wait for
        their checks); each rewind is counted in `rewinds[0]`."""
        start = session.position
        rewinds = [0] if rewinds is None else rewinds

        def next_logits(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            try:
                return self.next_logits(session, ids, mask, start, prompt_length)
            except Rewind:
                rewinds[0] += 1
                raise

        def settle() -> None:  # the answer looks complete: wait for its spot checks before returning it
            try:
                _rewind_if_untrusted(session, session.settle(), start, prompt_length)
            except Rewind:
                rewinds[0] += 1
                raise

        if settle_checks is None:
            settle_checks = self.sequence.cfg.settle_checks
        return next_logits, (settle if self.trust_layer is not None and settle_checks else None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> CausalLMOutput:
        """Logits (batch, tokens, vocab) for full sequences, without a session (no KV cache kept), and with
        `labels` (-100: ignored) the mean next-token cross-entropy `loss`, as transformers' models return them.
        With trainable prompts (`tuning`), under autograd: `loss.backward()` fills the prompts' gradients
        through the peers' backward passes (`swarm.training`). Inputs of any length: long ones travel in parts."""
        if self.tuning is not None:
            logits = self._tuned_logits(input_ids, attention_mask)
        else:
            logits = self._logits(input_ids, attention_mask)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return CausalLMOutput(loss=loss, logits=logits)

    __call__ = forward

    @torch.inference_mode()
    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self.head.embed(input_ids)
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.to(torch.int64)

        async def run(hidden: torch.Tensor) -> torch.Tensor:
            route = await self.sequence.make_route()
            runs = await run_route(self.transport, route, hidden, mask, timeout=self.sequence.cfg.request_timeout)
            return runs[-1].output

        return self.head.logits(self.loop.run(run(hidden)))

    def _tuned_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        tuning = self.tuning
        with torch.no_grad():
            embeds = self.head.embed_tokens(input_ids)
        batch, length = input_ids.shape[0], tuning.prompt_length
        prompts = tuning.prompt_embeddings.to(embeds.dtype)[None].expand(batch, -1, -1)
        hidden = torch.cat([prompts, embeds], dim=1)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            ones = torch.ones(batch, length, dtype=torch.int64)
            mask = torch.cat([ones, attention_mask.to(torch.int64)], dim=1)
        deep = tuning.deep_prompts if tuning.deep_prompts is not None else torch.empty(0)
        output = RemoteBlocksFunction.apply(hidden, deep, self.remote_blocks, self.loop.run, mask, self.micro_batches)
        return self.head(output[:, length:])

    def parameters(self) -> list[torch.nn.Parameter]:
        """What this client trains (its prompts); the peers' blocks and the local head stay frozen."""
        return [] if self.tuning is None else [p for p in self.tuning.parameters() if p.requires_grad]

    def save_prompts(self, directory: str | Path) -> Path:
        """Write the trained prompts (peft's prompt-tuning files; `from_pretrained(prompts=...)` loads them)."""
        if self.tuning is None:
            raise ConfigError("this model has no trainable prompts: open it with tuning='prompt' or 'deep_prompt'")
        return self.tuning.save(directory, self.checkpoint.manifest.name)

    def shutdown(self) -> None:
        if self.trust_layer is not None:
            self.loop.run(self.trust_layer.stop(), timeout=10)
        self.loop.run(self.p2p.shutdown(), timeout=5)
        self.loop.close()
        self.dht.shutdown()

    def __enter__(self) -> "DistributedModelForCausalLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
