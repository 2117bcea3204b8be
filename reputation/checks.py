"""Live spot checks by redundant execution: the client side of the trust layer.

A `SpotChecker` watches every step an inference session sends to a peer (it is the session's observer).
After the reply has arrived, it decides at the rate the node's policy gives for that peer whether to check
it, so a peer cannot tell checked steps from others. A check re-runs the hop's whole input so far on a second,
independent peer that serves the same blocks with the same declared compression (a stateless forward), and
compares the blocks' update for the step's tokens under the tolerance profile of the declared configuration.
A disagreement goes to up to two referees; a fault is recorded only when the majority agrees, and a checker
that the referees contradict is the one at fault. Every verdict is a signed attestation, spread by gossip.
At the end of a session the client countersigns each peer's last receipt: the ledger's proof of work.
Checks run as background tasks on the client's loop and never hold up the next token; `settle` lets a
finished answer wait for its own checks before it is returned.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from reputation.attest import Check, Receipt, tensor_digest
from reputation.node import ReputationNode
from reputation.spotcheck import choose_checker, referee_decision
from reputation.errors import ReputationError
from reputation.tolerance import DEFAULT_PROFILES, Agreement, ToleranceProfile, compare_updates, judge, profile_for
from swarm.errors import SwarmError
from swarm.hooks import StepRecord, SwarmView
from swarm.records import PeerSpan, online_spans
from swarm.transport import Transport

logger = logging.getLogger(__name__)

SETTLE_TIMEOUT = 10.0  # seconds an answer waits at most for its own spot checks


@dataclass
class CheckStats:
    """What the checker did, for `/stats`, tests and benchmarks."""

    responses: Counter = field(default_factory=Counter)  # replies seen per peer id: session steps and check runs
    checks: int = 0
    passes: int = 0
    faults: int = 0  # subjects confirmed at fault
    checker_faults: int = 0  # checkers the referees contradicted
    inconclusive: int = 0
    skipped: int = 0  # chosen but not run: no second peer, unknown profile, too many waiting
    bad_receipts: int = 0  # missing, unsigned or not matching the tensors
    pairs: Counter = field(default_factory=Counter)  # (subject dtype, checker dtype) of completed checks
    caught_after: dict[str, int] = field(default_factory=dict)  # peer id -> its responses seen when confirmed
    comparisons: deque = field(default_factory=lambda: deque(maxlen=10_000))  # (subject, checker, cos, rel_l2, verdict)
    settles: int = 0  # answers that waited for their own checks before being returned
    settle_seconds: float = 0.0  # the time they waited, in all
    executions: int = 0  # extra forward passes run for checks (checkers and referees)
    extra_tokens: int = 0  # tokens those passes processed


def decode_receipt(text: str) -> Receipt | None:
    try:
        return Receipt.decode(base64.b64decode(text, validate=True))
    except (ReputationError, ValueError, TypeError):
        return None


def profile_between(a: Receipt, b: Receipt, profiles: tuple[ToleranceProfile, ...] = DEFAULT_PROFILES) -> ToleranceProfile | None:
    """The tolerance for comparing two declared configurations, or None when they cannot be compared.

    Uncompressed dtypes are compared with each other (the looser profile wins). Compressed peers are compared
    only with peers declaring the same compression: their weights are the same deterministic function of the
    checkpoint, so honest pairs agree about as closely as uncompressed ones.
    """
    if a.compression != b.compression:
        return None
    try:
        pa, pb = profile_for(a.dtype, "none", None, profiles), profile_for(b.dtype, "none", None, profiles)
    except ReputationError:
        return None
    base = pa if pa.pass_max_rel_l2 >= pb.pass_max_rel_l2 else pb
    if a.compression == "none":
        return base
    try:
        return profile_for(a.dtype, a.compression, None, profiles)
    except ReputationError:
        return ToleranceProfile(f"{base.name}-{a.compression}", base.dtype, a.compression, None, base.pass_min_cosine,
                                base.pass_max_rel_l2, base.fail_min_cosine, base.fail_max_rel_l2)


class SpotChecker:
    def __init__(
        self,
        node: ReputationNode,
        transport: Transport,
        swarm: SwarmView,
        rng: random.Random | None = None,
        check_rate: float | None = None,  # a fixed rate for every peer; None: the node's adaptive policy
        referees: int = 2,
        max_running: int = 2,  # checks executing at once; more wait their turn
        max_queued: int = 64,  # checks waiting beyond this are dropped (counted as skipped)
        timeout: float = 60.0,
    ):
        self.node, self.transport, self.swarm = node, transport, swarm
        self.rng = rng or random.Random()
        self.check_rate, self.referees = check_rate, referees
        self.max_queued, self.timeout = max_queued, timeout
        self._running = asyncio.Semaphore(max_running)
        self.stats = CheckStats()
        self._tasks: set[asyncio.Task] = set()
        self._session_tasks: dict[str, set[asyncio.Task]] = {}
        self._last_receipts: dict[str, dict[tuple[str, int, int], str]] = {}  # session -> hop -> receipt

    # ---- observer hooks (called on the client's loop) ------------------------------------------------

    def on_step(self, record: StepRecord) -> None:
        peer = str(record.peer_id)
        self.stats.responses[peer] += 1
        if record.receipt:
            self._last_receipts.setdefault(record.session_id, {})[(peer, record.start, record.end)] = record.receipt
        if record.padded:
            return  # padded batches are not re-run (the mask would have to travel too)
        rate = self.node.check_rate(peer) if self.check_rate is None else self.check_rate
        if self.rng.random() >= rate:
            return
        if len(self._tasks) >= self.max_queued:
            self.stats.skipped += 1
            return
        task = asyncio.get_running_loop().create_task(self._check_safely(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        waiting = self._session_tasks.setdefault(record.session_id, set())
        waiting.add(task)
        task.add_done_callback(waiting.discard)

    def on_close(self, session_id: str) -> None:
        self._session_tasks.pop(session_id, None)
        for receipt_text in self._last_receipts.pop(session_id, {}).values():
            receipt = decode_receipt(receipt_text)
            if receipt is not None:
                self.node.countersign(receipt)

    async def settle(self, session_id: str, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait for the checks of this session's steps so far, at most `timeout` seconds (an answer is
        verified before it is returned; a check held up by a slow peer does not hold the answer for long)."""
        waiting = self._session_tasks.get(session_id)
        if waiting:
            began = time.perf_counter()
            await asyncio.wait(list(waiting), timeout=timeout)
            self.stats.settles += 1
            self.stats.settle_seconds += time.perf_counter() - began

    async def drain(self) -> None:
        """Wait for the checks still running (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def cancel(self) -> None:
        """Abandon the checks still running (client shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- one check ----------------------------------------------------------------------------------

    async def _check_safely(self, record: StepRecord) -> None:
        try:
            async with self._running:
                await self.check(record)
        except asyncio.CancelledError:
            raise
        except Exception:  # a check must never break the session it watches
            logger.warning("Spot check failed to run", exc_info=True)

    def _candidates(self, record: StepRecord, compression: str, exclude: set[str]) -> list[PeerSpan]:
        banned = {str(p) for p in self.swarm.banned()}
        return [
            s for s in online_spans(self.swarm.spans)
            if s.start <= record.start and record.end <= s.end
            and s.info.compression == compression and str(s.peer_id) not in exclude | banned
            and not self.node.is_blacklisted(str(s.peer_id))
        ]

    async def _run_on(self, span: PeerSpan, record: StepRecord, full: torch.Tensor) -> tuple[torch.Tensor, Receipt | None] | None:
        """The step's output as `span`'s peer computes it from the hop's whole input; None if it fails."""
        try:
            reply = await self.transport.forward(span.peer_id, record.start, record.end, full, timeout=self.timeout)
        except SwarmError as e:
            logger.debug(f"Check execution on {span.peer_id} failed: {e}")
            return None
        output = reply.output
        self.stats.responses[str(span.peer_id)] += 1
        self.stats.executions += 1
        self.stats.extra_tokens += full.shape[0] * full.shape[1]
        receipt = decode_receipt(reply.receipt)
        if receipt is not None and not _receipt_matches(receipt, str(span.peer_id), full, output):
            receipt = None
        return output[:, -record.inputs.shape[1]:], receipt

    async def check(self, record: StepRecord) -> str:
        """Check one step; returns the verdict recorded about the subject ("skipped" if none)."""
        subject = str(record.peer_id)
        receipt = decode_receipt(record.receipt) if record.receipt else None
        if receipt is None or not _receipt_matches(receipt, subject, record.inputs, record.output):
            self.stats.bad_receipts += 1
            return "skipped"
        await self.swarm.refresh_spans()
        full = torch.cat(record.history, dim=1)
        candidates = self._candidates(record, receipt.compression, {subject})
        checker = choose_checker(candidates, None, self.rng)
        if checker is None:
            self.stats.skipped += 1
            return "skipped"
        ran = await self._run_on(checker, record, full)
        if ran is None:
            self.stats.skipped += 1
            return "skipped"
        checked_output, checker_receipt = ran
        profile = profile_between(receipt, checker_receipt or receipt)
        if profile is None:
            self.stats.skipped += 1
            return "skipped"
        self.stats.checks += 1
        self.stats.pairs[(receipt.dtype, checker_receipt.dtype if checker_receipt else "?")] += 1
        agreement = compare_updates(record.inputs, checked_output, record.output)
        first = judge(agreement, profile)
        self.stats.comparisons.append((subject, str(checker.peer_id), agreement.min_token_cosine, agreement.rel_l2, first))
        if first == "pass":
            return self._conclude(receipt, agreement, "pass", profile, checker_receipt, record)
        # A disagreement: referees decide who is wrong, the subject or the checker.
        referee_spans = [s for s in self._candidates(record, receipt.compression, {subject, str(checker.peer_id)})]
        self.rng.shuffle(referee_spans)
        outputs = []
        for span in referee_spans:
            if len(outputs) == self.referees:
                break
            ran = await self._run_on(span, record, full)
            if ran is not None:
                outputs.append(ran[0])
        if not outputs:
            self.stats.inconclusive += 1
            self.node.attest(receipt, agreement, "inconclusive", profile.name)
            return "inconclusive"
        subject_votes = [first, *(judge(compare_updates(record.inputs, r, record.output), profile) for r in outputs)]
        checker_votes = [judge(compare_updates(record.inputs, r, checked_output), profile) for r in outputs]
        if checker_receipt is not None and referee_decision(checker_votes):
            self.stats.checker_faults += 1
            referee_view = compare_updates(record.inputs, outputs[0], checked_output)
            self.node.attest(checker_receipt, referee_view, "fail", profile.name)
            self.stats.caught_after.setdefault(str(checker.peer_id), self.stats.responses[str(checker.peer_id)])
            checker_receipt = None  # no "pass" for a checker found wrong
        verdict = "fail" if referee_decision(subject_votes) else "pass"
        return self._conclude(receipt, agreement, verdict, profile, checker_receipt, record)

    def _conclude(self, receipt: Receipt, agreement: Agreement, verdict: str, profile: ToleranceProfile,
                  checker_receipt: Receipt | None, record: StepRecord) -> str:
        self.node.attest(receipt, agreement, verdict, profile.name)
        if verdict == "pass":
            self.stats.passes += 1
            if checker_receipt is not None:  # the checker's work agreed too
                self.node.attest(checker_receipt, agreement, "pass", profile.name)
        else:
            self.stats.faults += 1
            subject = str(record.peer_id)
            self.stats.caught_after.setdefault(subject, self.stats.responses[subject])
            logger.warning(
                f"Spot check: {subject} is at fault on blocks {record.start}:{record.end} "
                f"(cosine {agreement.min_token_cosine:.3f}, relative L2 {agreement.rel_l2:.3f}, confirmed by referees)"
            )
        return verdict


def _receipt_matches(receipt: Receipt, signer: str, inputs: torch.Tensor, output: torch.Tensor) -> bool:
    return (
        receipt.verify() is Check.OK
        and receipt.signer == signer
        and receipt.input_digest == tensor_digest(inputs)
        and receipt.output_digest == tensor_digest(output)
    )
