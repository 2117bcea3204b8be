"""The trust layer on training work: receipts, credit and spot checks of the peers' forward and backward passes.

Every training reply (`swarm.hooks.TrainRecord`) must carry a receipt signed by the peer that replied, naming
the pass ("train:<request id>", step 0 for a forward and 1 for a backward), its blocks and at most the tokens
sent, with digests of what was sent (for a backward: the hop's input and its output's gradient, side by side)
and of what came back. A reply without one is that peer's fault: it is refused (the pass routes around it) and
blacklisted here. A valid receipt is countersigned at once with the client's own token count: the ledger's proof
of training work, paid only where another peer could have re-run it.

A sampled pass, forward or backward, at the node's check rate for that peer, is re-run on a route of other peers
over the same blocks (`swarm.training.forward_on_route`, `backward_on_route`; trusted peers first). A forward's
output is compared as an inference step's is, against peers of the same configuration only (`same_config_profile`);
a backward's input gradient under the gradient tolerance for the pair of dtypes (`reputation.gradients`). Forwards are checked too: a cheater that computes honest gradients but wrong hidden
states would otherwise corrupt every later hop's training unseen. A disagreement goes to referee routes whose
votes weigh by this node's trust (`weighted_referee_decision`), as for inference: a confirmed "fail" is this node's
own verdict and blacklists the peer for all its work; an unsettled one is inconclusive and blames nobody.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from reputation.attest import tensor_digest
from reputation.checks import ESTABLISHED, SEED_WEIGHT, decode_receipt
from reputation.gradients import compare_gradients, gradient_profile
from reputation.node import ReputationNode
from reputation.spotcheck import weighted_referee_decision
from reputation.tolerance import Agreement, Config, ToleranceProfile, compare_updates, judge, pair_profile, route_profile
from reputation.verify import signature_problem
from swarm.errors import BadReceiptError, SwarmError
from swarm.hooks import SwarmView, TrainRecord
from swarm.records import online_spans
from swarm.routing import RouteHop, find_route
from swarm.training import backward_on_route, forward_on_route
from swarm.transport import Transport

logger = logging.getLogger(__name__)


@dataclass
class TrainingCheckStats:
    replies: Counter = field(default_factory=Counter)  # training replies per peer
    backward_replies: Counter = field(default_factory=Counter)  # backward replies per peer
    forward_checks: int = 0  # of `checks`, those of forward passes
    checks: int = 0
    passes: int = 0
    faults: int = 0
    inconclusive: int = 0
    unverifiable: int = 0
    bad_receipts: int = 0
    countersigned: int = 0
    caught_after: dict[str, int] = field(default_factory=dict)  # peer -> its replies of that kind when confirmed
    comparisons: list = field(default_factory=list)  # (subject, checker route, min cosine, rel L2, verdict)


def train_receipt_problem(record: TrainRecord) -> str | None:
    """What is wrong with a training reply's receipt, in one line; None when it is valid for exactly it."""
    if not record.receipt:
        return "no receipt"
    receipt = decode_receipt(record.receipt)
    if receipt is None:
        return "the receipt cannot be decoded"
    problem = signature_problem(receipt, str(record.peer_id))
    if problem:
        return problem
    step = 0 if record.kind == "forward" else 1
    if (receipt.session_id, receipt.step) != (f"train:{record.request_id}", step):
        return "the receipt names other work than this training pass"
    if (receipt.block_start, receipt.block_end) != (record.start, record.end):
        return f"the receipt is for blocks {receipt.block_start}:{receipt.block_end}, not {record.start}:{record.end}"
    sent = record.inputs.shape[0] * record.inputs.shape[1]
    if receipt.tokens > sent:
        return f"the receipt claims {receipt.tokens} tokens of work, but {sent} were sent (inflated)"
    received = record.inputs if record.grad_output is None else torch.cat(
        [record.inputs, record.grad_output.to(record.inputs.dtype)], dim=-1)
    if receipt.input_digest != tensor_digest(received):
        return "the receipt's input digest does not match what was sent"
    if receipt.output_digest != tensor_digest(record.outputs[0]):
        return "the receipt's output digest does not match what was returned"
    return None


def same_config_profile(a: Config, b: Config) -> ToleranceProfile | None:
    """The forward tolerance of a training pass: peers of the same configuration only. Across dtypes, whole
    training sequences through many blocks disagree far more than the decode steps the pair tolerances were
    measured on (float32 against bfloat16 over 30 blocks with trained soft prompts: a token's update cosine 0.34,
    relative L2 0.43, in a live test), as gradients do."""
    return pair_profile(a, b) if a == b else None


class TrainingChecker:
    """The client's `swarm.hooks.TrainingObserver`: receipts, credit and spot checks of forward and backward
    passes."""

    def __init__(self, node: ReputationNode, transport: Transport, swarm: SwarmView, rng: random.Random | None = None,
                 check_rate: float | None = None, referees: int = 2, timeout: float = 60.0, max_running: int = 1):
        self.node, self.transport, self.swarm = node, transport, swarm
        self.rng = rng or random.Random()
        self.check_rate, self.referees, self.timeout = check_rate, referees, timeout
        self.stats = TrainingCheckStats()
        self._running = asyncio.Semaphore(max_running)
        self._tasks: set[asyncio.Task] = set()

    def on_train_reply(self, record: TrainRecord) -> None:
        peer = str(record.peer_id)
        self.stats.replies[peer] += 1
        problem = train_receipt_problem(record)
        if problem is not None:
            self.stats.bad_receipts += 1
            self.node.fault_seen(peer, f"a training reply without a valid receipt: {problem}")
            raise BadReceiptError(peer, problem)
        receipt = decode_receipt(record.receipt)
        tokens = record.inputs.shape[0] * record.inputs.shape[1]
        if self.node.countersign(receipt, tokens, verified=self._checkable(record)) is not None:
            self.stats.countersigned += 1
        if record.kind == "backward":
            self.stats.backward_replies[peer] += 1
        rate = self.node.check_rate(peer) if self.check_rate is None else self.check_rate
        if self.rng.random() < rate:
            task = asyncio.get_running_loop().create_task(self._check_safely(record))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the checks still running (tests, benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def cancel(self) -> None:
        """Abandon the checks still running (client shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _check_safely(self, record: TrainRecord) -> str:
        try:
            async with self._running:
                return await self.check(record)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a check must never break the training it watches
            logger.warning(f"{record.kind.capitalize()} spot check failed to run", exc_info=True)
            return self._unverifiable(record, f"internal error: {type(e).__name__}: {e}")

    def _unverifiable(self, record: TrainRecord, reason: str) -> str:
        self.stats.unverifiable += 1
        logger.info(f"{record.kind.capitalize()} check of {record.peer_id} on blocks {record.start}:{record.end} "
                    f"could not run: {reason}")
        return "unverifiable"

    def _weight(self, peer: str) -> float:
        score = self.node.score(peer)
        return max(score, SEED_WEIGHT) if peer in self.node.cfg.seeds else score

    def _config(self, peer: str) -> Config | None:
        for span in self.swarm.spans:
            if str(span.peer_id) == peer:
                return span.info.dtype, span.info.compression
        return None

    def _routes(self, record: TrainRecord, exclude: set[str]) -> list[list[RouteHop]]:
        """Routes of other peers over the record's blocks with a tolerance against the subject for the record's
        kind of pass; routes of trusted peers first. Equal latencies with a jitter: the fewest hops win, ties drawn
        at random."""
        subject = self._config(str(record.peer_id))
        banned = {str(p) for p in self.swarm.banned()}
        pair = gradient_profile if record.kind == "backward" else same_config_profile
        spans = [s for s in online_spans(self.swarm.spans)
                 if str(s.peer_id) not in exclude | banned and not self.node.is_blacklisted(str(s.peer_id))
                 and subject is not None and pair(subject, (s.info.dtype, s.info.compression)) is not None]
        latencies = {s.peer_id: 1.0 + 0.1 * self.rng.random() for s in spans}
        routes = []
        for pool in ([s for s in spans if self._weight(str(s.peer_id)) >= ESTABLISHED], spans):
            route = find_route(pool, latencies, record.start, record.end)
            if route is not None and route not in routes:
                routes.append(route)
        return routes

    def _checkable(self, record: TrainRecord) -> bool:
        return bool(self._routes(record, {str(record.peer_id)}))

    async def _execute(self, record: TrainRecord, exclude: set[str]) -> tuple[list[RouteHop], torch.Tensor] | None:
        for route in self._routes(record, exclude):
            try:
                if record.kind == "backward":
                    _, result = await backward_on_route(self.transport, route, record.inputs, record.grad_output,
                                                        record.mask, record.prompts, timeout=self.timeout)
                else:
                    result = await forward_on_route(self.transport, route, record.inputs, record.mask, record.prompts,
                                                    timeout=self.timeout)
                return route, result
            except SwarmError as e:
                logger.debug(f"{record.kind.capitalize()} check execution on {route} failed: {e}")
        return None

    def _profile(self, record: TrainRecord, route: list[RouteHop]) -> ToleranceProfile | None:
        subject_config = self._config(str(record.peer_id))
        if subject_config is None:
            return None
        checkers = [self._config(str(h.peer_id)) or ("?", "?") for h in route]
        if record.kind != "backward":
            return route_profile(subject_config, checkers) if all(c == subject_config for c in checkers) else None
        profiles = [gradient_profile(subject_config, c) for c in checkers]
        if any(p is None for p in profiles):
            return None
        return max(profiles, key=lambda p: p.pass_max_rel_l2)

    @staticmethod
    def _compare(record: TrainRecord, reference: torch.Tensor) -> Agreement:
        if record.kind == "backward":
            return compare_gradients(reference, record.outputs[0])
        return compare_updates(record.inputs, reference, record.outputs[0])

    async def check(self, record: TrainRecord) -> str:
        """Re-run the record's pass on other peers; "pass", "fail", "inconclusive" or "unverifiable"."""
        subject = str(record.peer_id)
        await self.swarm.refresh_spans()
        checker = await self._execute(record, {subject})
        if checker is None:
            return self._unverifiable(record, "no route of other peers with a tolerance against it could re-run it")
        route, reference = checker
        profile = self._profile(record, route)
        if profile is None:
            return self._unverifiable(record, "no calibrated tolerance for this pair of configurations")
        self.stats.checks += 1
        self.stats.forward_checks += record.kind == "forward"
        agreement = self._compare(record, reference)
        verdict = judge(agreement, profile)
        self.stats.comparisons.append((subject, "+".join(str(h.peer_id) for h in route), agreement.min_token_cosine,
                                       agreement.rel_l2, verdict))
        receipt = decode_receipt(record.receipt)
        checker_trusted = min(self._weight(str(h.peer_id)) for h in route) >= ESTABLISHED
        if verdict == "pass":
            if checker_trusted:  # agreement among untrusted peers proves nothing (they may be one cheater)
                self.node.attest(receipt, agreement, "pass", profile.name)
            self.stats.passes += 1
            return "pass"
        votes, weights, used = [], [], {subject, *(str(h.peer_id) for h in route)}
        for _ in range(self.referees):
            referee = await self._execute(record, used)
            if referee is None:
                break
            referee_route, referee_result = referee
            used |= {str(h.peer_id) for h in referee_route}
            weights.append(min(self._weight(str(h.peer_id)) for h in referee_route))
            votes.append(judge(self._compare(record, referee_result), profile))
        decision = weighted_referee_decision(votes, weights) if votes else "inconclusive"
        if decision == "fail" or (not votes and checker_trusted and verdict == "fail"):
            return self._fault(record, receipt, agreement, profile.name)
        self.stats.inconclusive += 1
        self.node.attest(receipt, agreement, "inconclusive", profile.name)
        return "inconclusive"

    def _fault(self, record: TrainRecord, receipt, agreement: Agreement, profile: str) -> str:
        subject = str(record.peer_id)
        self.stats.faults += 1
        replies = self.stats.backward_replies if record.kind == "backward" else self.stats.replies
        self.stats.caught_after.setdefault(subject, replies[subject])
        self.node.attest(receipt, agreement, "fail", profile)
        what = "gradient" if record.kind == "backward" else "update"
        logger.warning(f"{record.kind.capitalize()} check: {subject} is at fault on blocks {record.start}:{record.end} "
                       f"({what} cosine {agreement.min_token_cosine:.3f}, relative L2 {agreement.rel_l2:.3f})")
        return "fail"
