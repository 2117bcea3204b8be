"""Live spot checks by redundant execution: the client side of the trust layer.

A `SpotChecker` watches every step an inference session sends to a peer (it is the session's observer).
After the reply has arrived, it decides at the rate the node's policy gives for that peer whether to check
it, so a peer cannot tell checked steps from others. A check re-runs the hop's whole input so far (with its
attention mask when the batch is padded) on a route of other peers that covers the hop's blocks: one peer or
several chained, whatever their spans (`swarm.routing.find_route` over everybody but the subject and banned or
blacklisted peers); where there is none, a client with memory to spare runs the blocks itself
(`swarm.local_blocks`), and its own run decides. Long histories travel in chunks through a temporary session on each checker
(`swarm.stateless`), so no message limit switches a check off. Routes whose peers this node already trusts come
first, then the tightest calibrated tolerance for the pair of declared configurations
(`reputation.tolerance.pair_profile`). The blocks' update for the step's tokens is compared under that tolerance.
A session's deep prompts go with every re-run of its history (the checkers', the referees' and a local one), so a
peer that cheats only where prompts are added is checked like any other.

A disagreement goes to up to two referee routes, independent of the subject and, where possible, of the first
checkers. Their votes weigh by this node's trust in them (`reputation.spotcheck.weighted_referee_decision`),
never by how many identities agree: a fault needs the trusted weight of the referees siding with the checker to
exceed clearly that of those siding with the subject; referees siding clearly with the subject blame a one-peer
checker route (a chained route is only inconclusive: which of its hops erred is unknown) and pass the subject;
anything else is inconclusive and blames nobody. Agreement between two executions mints trust (a "pass"
attestation) only when one side is already trusted here, or while nobody serving those blocks is (a cold
start); so newcomers agreeing with each other, however many, earn nothing once trusted peers are around. At a cold
start an unsettled dispute is weighed again once that agreement is published as trust (`_second_look`); one that
stays unsettled still keeps a contradicted, untrusted subject out of this client's routes for a while.

When the hop ends at the model's last block and the client gave its head (final norm + LM head), each comparison
also carries both outputs through that head (`reputation.effect`): a step whose top-1 token at the last position of
a row (the one generation reads) differs from the checker's where the checker's lead is clear fails like a step
outside the tolerance, referees included. A steer small enough for a loose pair's tolerance is caught by what it
does to the answer. Hops that end earlier are judged by the numeric tolerance alone.

Every check ends in one outcome, `check()`'s return value: "pass", "fail", "inconclusive" or "unverifiable" (it
could not run: no receipt, no other route, every route failed). An unverifiable check is logged at INFO with
its reason and counted. Every verdict is a signed attestation, spread by gossip. At the end of a session the
client countersigns each peer's last receipt with its own count of the tokens it sent through that hop
(reputation.sent_tokens): the ledger's proof of work, which pays no more than that count, and never a peer whose
reply in that session came without a valid receipt (see `receipt_fault`). Every hop-step a session observes is
tallied (verified, failed, could not be checked, pending, unchecked), so an answer can say how much of it was
verified (`coverage`). Checks run as background tasks on the client's loop and never hold up the next token;
`settle` lets a finished answer wait for its own checks.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from reputation.attest import Check, Evidence, Receipt, tensor_digest
from reputation.effect import Effect, effect_verdict, routes_margin
from reputation.errors import ReputationError
from reputation.node import ReputationNode
from reputation.sent_tokens import SentTokens
from reputation.spotcheck import weighted_referee_decision
from reputation.tolerance import Agreement, Config, ToleranceProfile, compare_updates, judge, pair_profile, route_profile
from swarm.errors import SwarmError
from swarm.hooks import Coverage, StepRecord, SwarmView
from swarm.local_blocks import LocalBlocks
from swarm.protocol import inputs_digest
from swarm.records import PeerSpan, online_spans
from swarm.routing import RouteHop, find_route
from swarm.stateless import CHUNK_BYTES, StatelessRun, run_route
from swarm.transport import Transport

logger = logging.getLogger(__name__)

SETTLE_TIMEOUT = 10.0  # seconds an answer waits at most for its own spot checks
ESTABLISHED = 0.1  # relative trust (1.0 = an average peer) from which a peer's agreement counts as verification
SEED_WEIGHT = 1.0  # the least weight of a seed's vote (a seed's relative trust is 0 before anyone is checked)
ROUTE_ATTEMPTS = 3  # routes tried for one execution before the check is unverifiable


@dataclass
class CheckStats:
    """What the checker did, for `/stats`, tests and benchmarks."""

    responses: Counter = field(default_factory=Counter)  # replies seen per peer id: session steps and check runs
    served: Counter = field(default_factory=Counter)  # session hop-steps per peer id (check runs not included)
    served_block_tokens: int = 0  # batch x new tokens x blocks of the session steps seen: the work served
    checks: int = 0
    passes: int = 0
    faults: int = 0  # subjects confirmed at fault
    checker_faults: int = 0  # checkers the referees contradicted
    inconclusive: int = 0
    avoided: int = 0  # unsettled disputes after which this client avoided the subject (`dispute_seen`)
    skipped: int = 0  # chosen but never started: too many checks waiting (also counted as unverifiable)
    unverifiable: int = 0  # checks that could not run (each logged at INFO with its reason)
    unverifiable_reasons: Counter = field(default_factory=Counter)  # reason -> count
    chained: int = 0  # checks whose checker route had more than one hop
    padded: int = 0  # checks of padded batches (the attention mask travelled with the re-run)
    chunked: int = 0  # checks whose history took more than one message to a checker
    bad_receipts: int = 0  # missing, unsigned or not matching the tensors
    pairs: Counter = field(default_factory=Counter)  # (subject dtype, checker route's dtypes) compared, referees too
    caught_after: dict[str, int] = field(default_factory=dict)  # peer id -> its responses seen when confirmed
    comparisons: deque = field(default_factory=lambda: deque(maxlen=10_000))  # (subject, checker, cos, rel_l2, verdict)
    settles: int = 0  # answers that waited for their own checks before being returned
    settle_seconds: float = 0.0  # the time they waited, in all
    executions: int = 0  # extra forward passes run for checks (checkers and referees)
    extra_tokens: int = 0  # tokens those passes processed
    effect_checks: int = 0  # comparisons carried through the client's head (hops ending at the last block)
    effect_fails: int = 0  # of them, those where a clear top-1 token changed (the answer would have)
    effect_only: int = 0  # of those, the ones the numeric tolerance alone would not have failed
    extra_blocks: int = 0  # blocks those passes re-ran (each pass counted once, whatever its length)
    extra_block_tokens: int = 0  # batch x tokens x blocks those passes re-ran: the work checks cost
    local: int = 0  # checks this client ran on blocks it loaded itself (no other peer served the hop's blocks)
    local_block_tokens: int = 0  # batch x tokens x blocks those local runs computed (on the client, not on peers)


@dataclass
class StepTally:
    """One observed hop-step and how far its verification got."""

    position: int
    start: int
    end: int
    state: str = "unchecked"  # unchecked | pending | verified | failed | unverifiable


OUTCOMES = {"pass": "verified", "fail": "failed"}  # a check's verdict -> its step's state; anything else: unverifiable


def decode_receipt(text: str) -> Receipt | None:
    try:
        return Receipt.decode(base64.b64decode(text, validate=True))
    except (ReputationError, ValueError, TypeError):
        return None


def profile_between(a: Receipt, b: Receipt) -> ToleranceProfile | None:
    """The tolerance for comparing two declared configurations (`reputation.tolerance.pair_profile`), or None
    when the pair has no calibration."""
    return pair_profile((a.dtype, a.compression), (b.dtype, b.compression))


@dataclass
class Execution:
    """One route's re-run of a checked step."""

    route: list[RouteHop]
    output: torch.Tensor  # the route's output for the step's tokens
    receipts: list[Receipt | None]  # each hop's receipt of its last message, when it verified
    configs: list[Config]  # each hop's declared configuration (its receipt's, else its announcement's)

    @property
    def peers(self) -> list[str]:
        return [str(hop.peer_id) for hop in self.route]


class Unverifiable(Exception):
    """A check that cannot run, and why."""


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
        settle_timeout: float | None = SETTLE_TIMEOUT,  # None: an answer waits for every one of its checks
        chunk_bytes: int = CHUNK_BYTES,  # hidden states per message to a checker (a long history goes in chunks)
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,  # the client's final norm + LM head: hidden
        # (batch, tokens, hidden) -> logits (batch, tokens, vocab); None: no effect check
        num_blocks: int | None = None,  # the model's block count: hops ending there get the effect check
        local: LocalBlocks | None = None,  # blocks this client may load to check hops nobody else serves
    ):
        self.node, self.transport, self.swarm = node, transport, swarm
        self.head, self.num_blocks, self.local = head, num_blocks, local
        self.rng = rng or random.Random()
        self.check_rate, self.referees = check_rate, referees
        self.max_queued, self.timeout, self.settle_timeout = max_queued, timeout, settle_timeout
        self.chunk_bytes = chunk_bytes
        self._running = asyncio.Semaphore(max_running)
        self.stats = CheckStats()
        self._tasks: set[asyncio.Task] = set()
        self._session_tasks: dict[str, set[asyncio.Task]] = {}
        self._tallies: dict[str, list[StepTally]] = {}  # session -> its hop-steps, by position
        self._unpaid: dict[str, set[str]] = {}  # session -> peers that sent it a reply without a valid receipt
        self.sent = SentTokens()  # per session and hop: tokens sent and the last receipt (countersigned at close)
        self._weights: dict[str, float] = {}  # trust snapshot of the latest check (see _weight)

    # ---- observer hooks (called on the client's loop) ------------------------------------------------

    def on_step(self, record: StepRecord) -> None:
        peer = str(record.peer_id)
        self.stats.responses[peer] += 1
        self.stats.served[peer] += 1
        self.stats.served_block_tokens += record.inputs.shape[0] * record.inputs.shape[1] * (record.end - record.start)
        tally = self._tally(record)
        self.sent.observe(record)
        rate = self.node.check_rate(peer) if self.check_rate is None else self.check_rate
        if self.rng.random() >= rate:
            return
        if len(self._tasks) >= self.max_queued:
            self.stats.skipped += 1
            tally.state = "unverifiable"
            self._unverifiable(record, f"too many checks waiting ({len(self._tasks)})")
            return
        tally.state = "pending"
        task = asyncio.get_running_loop().create_task(self._check_and_tally(record, tally))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        waiting = self._session_tasks.setdefault(record.session_id, set())
        waiting.add(task)
        task.add_done_callback(waiting.discard)

    def on_close(self, session_id: str) -> None:
        """Countersign each hop's last receipt with the tokens this client sent through it: the ledger pays no
        more, and a receipt claiming more is an inflation fault. A hop nobody else could verify earns nothing."""
        self._session_tasks.pop(session_id, None)
        self._tallies.pop(session_id, None)
        unpaid = self._unpaid.pop(session_id, set())
        for hop in self.sent.close(session_id):
            receipt = decode_receipt(hop.receipt) if hop.receipt else None
            if hop.peer in unpaid or receipt is None or (
                receipt.signer, receipt.session_id, receipt.block_start, receipt.block_end
            ) != (hop.peer, session_id, hop.start, hop.end):
                continue
            self.node.countersign(receipt, hop.sent, verified=self._verifiable(hop.peer, hop.start, hop.end))

    def _verifiable(self, peer: str, start: int, end: int) -> bool:
        """Whether other peers (online, not blacklisted) serve blocks [start, end) between them, so that the
        hop's work could be re-run on a route of theirs, or this client can run those blocks itself."""
        if self.local is not None and self.local.fits(start, end):
            return True
        spans = sorted(
            (s for s in online_spans(self.swarm.spans)
             if str(s.peer_id) != peer and not self.node.is_blacklisted(str(s.peer_id))),
            key=lambda s: s.start,
        )
        covered = start
        for span in spans:
            if span.start > covered:
                break
            covered = max(covered, span.end)
            if covered >= end:
                return True
        return covered >= end

    async def settle(self, session_id: str, timeout: float | None = None) -> None:
        """Wait for the checks of this session's steps so far, at most `timeout` seconds (default:
        `settle_timeout`; an answer is verified before it is returned, and a check held up by a slow peer
        does not hold the answer for long unless the client is strict)."""
        timeout = self.settle_timeout if timeout is None else timeout
        waiting = self._session_tasks.get(session_id)
        if waiting:
            began = time.perf_counter()
            await asyncio.wait(list(waiting), timeout=timeout)
            self.stats.settles += 1
            self.stats.settle_seconds += time.perf_counter() - began

    # ---- verification coverage and receipt faults ----------------------------------------------------

    def _tally(self, record: StepRecord) -> StepTally:
        """A new tally entry for this hop-step. A step sent again after a rollback replaces the entries it
        redoes: every later position, and the same position on overlapping blocks (entries stay sorted by
        position, so only the tail is looked at)."""
        tallies = self._tallies.setdefault(record.session_id, [])
        kept: list[StepTally] = []
        while tallies and tallies[-1].position >= record.position:
            old = tallies.pop()
            if old.position == record.position and (old.end <= record.start or record.end <= old.start):
                kept.append(old)
        tallies.extend(reversed(kept))
        tally = StepTally(record.position, record.start, record.end)
        tallies.append(tally)
        return tally

    async def _check_and_tally(self, record: StepRecord, tally: StepTally) -> None:
        verdict = await self._check_safely(record)
        tally.state = OUTCOMES.get(verdict, "unverifiable")  # "unverifiable" checks were logged with their reason

    def coverage(self, session_id: str, since: int = 0) -> Coverage:
        """How much of this session's hop-steps at positions `since` and later the checks verified."""
        states = Counter(t.state for t in self._tallies.get(session_id, ()) if t.position >= since)
        return Coverage(steps=sum(states.values()), verified=states["verified"], failed=states["failed"],
                        unverifiable=states["unverifiable"], pending=states["pending"])

    def receipt_fault(self, session_id: str, peer_id: str) -> None:
        """`peer_id` sent this session a reply without a valid receipt: it gets no countersignature for any
        of its work in the session."""
        self._unpaid.setdefault(session_id, set()).add(peer_id)

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

    async def _check_safely(self, record: StepRecord) -> str:
        """The check's verdict ("error" if it broke)."""
        try:
            async with self._running:
                return await self.check(record)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a check must never break the session it watches
            logger.warning("Spot check failed to run", exc_info=True)
            return self._unverifiable(record, f"internal error: {type(e).__name__}: {e}")

    def _unverifiable(self, record: StepRecord, reason: str) -> str:
        self.stats.unverifiable += 1
        self.stats.unverifiable_reasons[reason.split(":")[0]] += 1
        logger.info(f"Spot check of {record.peer_id} on blocks {record.start}:{record.end} could not run "
                    f"(the step stays unverified): {reason}")
        return "unverifiable"

    def _snapshot_weights(self, subject: str) -> None:
        """Read this node's trust in the subject and in every peer announcing blocks at once, from one published
        snapshot, as the check begins: a check that read the checker's trust before its execution and the
        subject's after a background refresh landed meanwhile would weigh them by different snapshots (and at
        the end of a cold start, call an honest step's agreement one with an untrusted peer)."""
        peers = {subject} | {str(s.peer_id) for s in self.swarm.spans}
        self._weights = {}
        for peer, score in self.node.scores(sorted(peers)).items():
            self._weights[peer] = max(score, SEED_WEIGHT) if peer in self.node.cfg.seeds else score

    def _weight(self, peer: str) -> float:
        """This node's trust in `peer` as a referee: its relative trust here (seeds at least SEED_WEIGHT), as it
        stood when the check began (what a check attests does not sway its own verdict)."""
        weights = self._weights
        if peer not in weights:
            score = self.node.score(peer)
            weights[peer] = max(score, SEED_WEIGHT) if peer in self.node.cfg.seeds else score
        return weights[peer]

    def _route_weight(self, peers: list[str]) -> float:
        """A chain's output is only as trustworthy as its least trusted hop."""
        return min((self._weight(p) for p in peers), default=0.0)

    def _usable(self, exclude: set[str]) -> list[PeerSpan]:
        banned = {str(p) for p in self.swarm.banned()}
        return [
            s for s in online_spans(self.swarm.spans)
            if str(s.peer_id) not in exclude and str(s.peer_id) not in banned
            and not self.node.is_blacklisted(str(s.peer_id))
        ]

    def _candidates(self, record: StepRecord, subject: Config, exclude: set[str]) -> list[list[RouteHop]]:
        """Routes over the hop's blocks that avoid `exclude`, best first: routes of trusted peers before others,
        and within each, the tightest calibrated tolerance with the subject's configuration first. Latencies are
        uniform with a random jitter, so the fewest hops win and equals are drawn at random (a peer cannot tell
        when it will be a checker)."""
        tolerance: dict[str, float] = {}
        spans = []
        for span in self._usable(exclude):
            profile = pair_profile(subject, (span.info.dtype, span.info.compression))
            if profile is not None:
                spans.append(span)
                tolerance[str(span.peer_id)] = profile.pass_max_rel_l2
        latencies = {s.peer_id: 1.0 + 0.1 * self.rng.random() for s in spans}
        trusted = {str(s.peer_id) for s in spans if self._weight(str(s.peer_id)) >= ESTABLISHED}
        routes: list[list[RouteHop]] = []
        for trusted_only in (True, False):
            for level in sorted(set(tolerance.values())):
                pool = [s for s in spans if tolerance[str(s.peer_id)] <= level
                        and (not trusted_only or str(s.peer_id) in trusted)]
                route = find_route(pool, latencies, record.start, record.end)
                if route is not None and route not in routes:
                    routes.append(route)
        return routes

    async def _execute(self, record: StepRecord, full: torch.Tensor, subject: Config, exclude: set[str],
                       avoid: set[str] = frozenset()) -> Execution:
        """Re-run the step on the best route that avoids `exclude` (and `avoid` where possible); on failure, on
        the next best without the failed peer. Raises `Unverifiable` when no route is left."""
        exclude, tried = set(exclude), 0
        last_error = f"no route of other peers covers blocks {record.start}:{record.end} with a calibrated tolerance"
        while tried < ROUTE_ATTEMPTS:
            routes = self._candidates(record, subject, exclude | set(avoid)) or self._candidates(record, subject, exclude)
            if not routes:
                break
            route = routes[0]
            tried += 1
            try:
                runs = await run_route(self.transport, route, full, record.mask, timeout=self.timeout,
                                       chunk_bytes=self.chunk_bytes, prompts=record.prompts)
            except SwarmError as e:
                last_error = f"the checker route failed: {e}"
                logger.debug(f"Check execution on {' -> '.join(str(h.peer_id) for h in route)} failed: {e}")
                failed = getattr(e, "peer", None)
                exclude |= {failed} if failed else {str(h.peer_id) for h in route}
                continue
            return self._execution(record, route, full, runs)
        raise Unverifiable(last_error)

    def _execution(self, record: StepRecord, route: list[RouteHop], full: torch.Tensor,
                   runs: list[StatelessRun]) -> Execution:
        announced = {str(s.peer_id): (s.info.dtype, s.info.compression) for s in self.swarm.spans}
        receipts, configs, hop_input = [], [], full
        for hop, run in zip(route, runs):
            peer = str(hop.peer_id)
            self.stats.responses[peer] += 1
            self.stats.executions += 1
            self.stats.extra_tokens += full.shape[0] * full.shape[1]
            self.stats.extra_blocks += hop.end - hop.start
            self.stats.extra_block_tokens += full.shape[0] * full.shape[1] * (hop.end - hop.start)
            receipt = decode_receipt(run.receipt)
            if receipt is not None and not _receipt_matches(
                receipt, peer, hop_input[:, run.receipt_from:], run.output[:, run.receipt_from:], run.receipt_prompts
            ):
                receipt = None
            receipts.append(receipt)
            configs.append((receipt.dtype, receipt.compression) if receipt else announced.get(peer, ("?", "?")))
            hop_input = run.output
        if any(run.messages > 1 for run in runs):
            self.stats.chunked += 1
        return Execution(route, runs[-1].output[:, -record.inputs.shape[1]:], receipts, configs)

    def _cold_start(self, record: StepRecord) -> bool:
        """This node trusts nobody serving any of the hop's blocks yet: agreement is all there is to go on. Once
        it trusts one of them, newcomers there earn trust only by agreeing with trusted peers."""
        peers = {str(record.peer_id)} | {str(s.peer_id) for s in self._usable(set())
                                         if s.start < record.end and record.start < s.end}
        return not any(self._weight(p) >= ESTABLISHED for p in peers)

    async def check(self, record: StepRecord) -> str:
        """Check one step; returns its outcome: "pass", "fail", "inconclusive" or "unverifiable"."""
        subject = str(record.peer_id)
        receipt = decode_receipt(record.receipt) if record.receipt else None
        if receipt is None or not _receipt_matches(receipt, subject, record.inputs, record.output,
                                                   record.carried_prompts):
            self.stats.bad_receipts += 1
            return self._unverifiable(record, "no valid receipt for the step's tensors")
        if record.padded and record.mask is None:
            return self._unverifiable(record, "a padded step without its attention mask")
        subject_config = (receipt.dtype, receipt.compression)
        await self.swarm.refresh_spans()
        self._snapshot_weights(subject)
        full = torch.cat(record.history, dim=1)
        try:
            checker = await self._execute(record, full, subject_config, {subject})
        except Unverifiable as e:
            return await self._check_locally(record, receipt, full, str(e))
        profile = route_profile(subject_config, checker.configs)
        if profile is None:
            return await self._check_locally(
                record, receipt, full, f"no calibrated tolerance between {subject_config} and {checker.configs}")
        self.stats.checks += 1
        self.stats.chained += len(checker.route) > 1
        self.stats.padded += record.mask is not None
        self.stats.pairs[(receipt.dtype, "+".join(dtype for dtype, _ in checker.configs))] += 1
        agreement, first, effect = await self._judge(record, checker.output, record.output, profile,
                                                     self._margin([subject_config], checker.configs))
        self.stats.comparisons.append((subject, "+".join(checker.peers), agreement.min_token_cosine, agreement.rel_l2, first))
        cold = self._cold_start(record)
        if first == "pass":
            return self._agreed(record, receipt, agreement, profile, checker, cold)
        return await self._dispute(record, receipt, agreement, profile, checker, full, cold, effect)

    async def _check_locally(self, record: StepRecord, receipt: Receipt, full: torch.Tensor, why: str) -> str:
        """No other peer can re-run the hop (`why`): this client runs its blocks itself where they fit its budget
        for local blocks (`swarm.local_blocks`). Its own execution is the reference it trusts most, so the verdict
        needs no referee; it is attested (with the step as evidence on a fault) like any other."""
        local = self.local
        if local is None or not local.fits(record.start, record.end):
            return self._unverifiable(record, why)
        subject_config, own = (receipt.dtype, receipt.compression), (local.dtype_name, "none")
        profile = route_profile(subject_config, [own])
        if profile is None:
            return self._unverifiable(record, f"{why}; no calibrated tolerance between {subject_config} and {own}")
        output = await asyncio.to_thread(local.run, record.start, record.end, full, record.mask, record.prompts)
        output = output[:, -record.inputs.shape[1]:]
        self.stats.checks += 1
        self.stats.local += 1
        self.stats.local_block_tokens += full.shape[0] * full.shape[1] * (record.end - record.start)
        self.stats.pairs[(receipt.dtype, f"{local.dtype_name} (this client)")] += 1
        agreement, verdict, effect = await self._judge(record, output, record.output, profile,
                                                       self._margin([subject_config], [own]))
        self.stats.comparisons.append((str(record.peer_id), "this client", agreement.min_token_cosine,
                                       agreement.rel_l2, verdict))
        if verdict == "inconclusive":
            return self._inconclusive(receipt, agreement, profile, "between the thresholds against this client's run")
        return self._conclude(receipt, agreement, verdict, profile, None, record, effect, by="this client's own run")

    def _margin(self, a: list[Config], b: list[Config]) -> float | None:
        return routes_margin(a, b) if self.head is not None and self.num_blocks is not None else None

    async def _judge(self, record: StepRecord, reference: torch.Tensor, other: torch.Tensor, profile: ToleranceProfile,
                     margin: float | None) -> tuple[Agreement, str, Effect | None]:
        """`other`'s agreement with `reference` (both the hop's output for the step) and the verdict on it: the
        numeric tolerance's, and where the hop ends at the model's last block (and `margin` is calibrated), a
        "fail" also when the top-1 token the answer reads changed at a clear lead (`reputation.effect`)."""
        agreement = compare_updates(record.inputs, reference, other)
        verdict = judge(agreement, profile)
        if margin is None or record.end != self.num_blocks:
            return agreement, verdict, None
        effect = await asyncio.to_thread(self._effect, reference, other, margin)  # a vocabulary-sized matmul
        self.stats.effect_checks += 1
        if effect.verdict == "fail":
            self.stats.effect_fails += 1
            self.stats.effect_only += verdict != "fail"
            verdict = "fail"
        return agreement, verdict, effect

    def _effect(self, reference: torch.Tensor, other: torch.Tensor, margin: float) -> Effect:
        """The effect check at the last position of each row: the one position whose logits generation reads
        (the last block's output elsewhere in a step feeds nothing the client uses)."""
        return effect_verdict(self.head(other[:, -1:]), self.head(reference[:, -1:]), margin)  # (batch, 1, vocab)

    def _agreed(self, record: StepRecord, receipt: Receipt, agreement: Agreement, profile: ToleranceProfile,
                checker: Execution, cold: bool) -> str:
        """The subject and the checker route agree: a pass where one side is trusted here (or at a cold start);
        between untrusted newcomers, agreement proves nothing (they may be one cheater's identities)."""
        subject_trusted = self._weight(str(record.peer_id)) >= ESTABLISHED
        checker_trusted = self._route_weight(checker.peers) >= ESTABLISHED
        if not (checker_trusted or cold):
            return self._inconclusive(receipt, agreement, profile,
                                      f"{record.peer_id} agreed only with untrusted peers {', '.join(checker.peers)}")
        single = len(checker.route) == 1
        credit_checker = subject_trusted or cold
        self._vouch([r for r in checker.receipts[single:]] if credit_checker else [], agreement, profile)
        return self._conclude(receipt, agreement, "pass", profile,
                              checker.receipts[0] if single and credit_checker else None, record)

    def _vouch(self, receipts: list[Receipt | None], agreement: Agreement, profile: ToleranceProfile) -> None:
        for receipt in receipts:
            if receipt is not None:
                self.node.attest(receipt, agreement, "pass", profile.name)

    def _inconclusive(self, receipt: Receipt, agreement: Agreement, profile: ToleranceProfile, why: str) -> str:
        self.stats.inconclusive += 1
        self.node.attest(receipt, agreement, "inconclusive", profile.name)
        logger.info(f"Spot check of {receipt.signer} on blocks {receipt.block_start}:{receipt.block_end} "
                    f"is inconclusive: {why}")
        return "inconclusive"

    async def _dispute(self, record: StepRecord, receipt: Receipt, agreement: Agreement, profile: ToleranceProfile,
                       checker: Execution, full: torch.Tensor, cold: bool, effect: Effect | None = None) -> str:
        """The subject and the checker route disagree: referee routes decide, weighed by trust."""
        subject = str(record.peer_id)
        subject_config = (receipt.dtype, receipt.compression)
        referees: list[Execution] = []
        used = set(checker.peers)
        for _ in range(self.referees):
            try:
                referee = await self._execute(record, full, subject_config, {subject, *used} - set(checker.peers),
                                              avoid=used)
            except Unverifiable:
                break
            if referee.route in [checker.route, *(r.route for r in referees)]:
                break  # no route left but those already heard
            referees.append(referee)
            used |= set(referee.peers)
        if not referees:
            self._avoid_if_contradicted(record, checker, [])
            return self._inconclusive(receipt, agreement, profile, "a disagreement and no referee route to settle it")
        weights, on_subject, on_checker = [], [], []
        for referee in referees:
            self.stats.pairs[(receipt.dtype, "+".join(dtype for dtype, _ in referee.configs))] += 1
            weights.append(self._route_weight(referee.peers))
            with_subject = route_profile(subject_config, referee.configs) or profile
            _, vote, _ = await self._judge(record, referee.output, record.output, with_subject,
                                           self._margin([subject_config], referee.configs))
            on_subject.append(vote)
            independent = not set(referee.peers) & set(checker.peers)
            with_checker = _routes_profile(checker.configs, referee.configs) or profile
            if independent:
                _, vote, _ = await self._judge(record, referee.output, checker.output, with_checker,
                                               self._margin(checker.configs, referee.configs))
            on_checker.append(vote if independent else "inconclusive")
        subject_verdict = weighted_referee_decision(on_subject, weights)
        checker_verdict = weighted_referee_decision(on_checker, weights)
        self._corroborate(record, receipt, checker, referees, on_subject, on_checker, cold, subject_verdict == "pass")
        if cold and subject_verdict == "inconclusive" and checker_verdict == "inconclusive":
            weights = await self._second_look(subject, referees)
            subject_verdict = weighted_referee_decision(on_subject, weights)
            checker_verdict = weighted_referee_decision(on_checker, weights)
        if subject_verdict == "fail":
            return self._conclude(receipt, agreement, "fail", profile, None, record, effect)
        if checker_verdict == "fail":
            self._blame_checker(checker, referees, on_checker, record, profile)
        if subject_verdict == "pass":
            return self._conclude(receipt, agreement, "pass", profile, None, record)
        if checker_verdict != "fail":
            self._avoid_if_contradicted(record, checker, on_subject)
        votes = ", ".join(f"{'+'.join(r.peers)}: {v} (weight {w:.2f})" for r, v, w in zip(referees, on_subject, weights))
        return self._inconclusive(receipt, agreement, profile, f"the referees' trusted weight decides nothing ({votes})")

    async def _second_look(self, subject: str, referees: list[Execution]) -> list[float]:
        """The referees' weights again, once the trust that a cold start's agreement just minted (`_corroborate`)
        is published: at a cold start that agreement is all there is to go on (the README's cold-start limit), and
        it decides this dispute as it would decide the next one."""
        await asyncio.to_thread(self.node.refresh, True)
        self._snapshot_weights(subject)
        return [self._route_weight(referee.peers) for referee in referees]

    def _avoid_if_contradicted(self, record: StepRecord, checker: Execution, on_subject: list[str]) -> None:
        """An unsettled dispute still decides what this client uses: a subject it does not trust, contradicted by
        the checker route and by every referee (or, with no referee, by a trusted checker route), is avoided here
        (`ReputationNode.dispute_seen`) and its output not used. A trusted subject is never avoided on the word of
        untrusted peers, so newcomers cannot push a client off the peers it trusts."""
        subject = str(record.peer_id)
        if self._weight(subject) >= ESTABLISHED or "pass" in on_subject:
            return
        if (on_subject and all(vote == "fail" for vote in on_subject)) or self._route_weight(checker.peers) >= ESTABLISHED:
            self.stats.avoided += 1
            self.node.dispute_seen(subject, f"its output for blocks {record.start}:{record.end} was contradicted by "
                                            f"{1 + len(on_subject)} other execution(s) and trust here cannot settle it")

    def _blame_checker(self, checker: Execution, referees: list[Execution], on_checker: list[str],
                       record: StepRecord, profile: ToleranceProfile) -> None:
        """Referees clearly contradict the checker route: blame it if it is one peer; a chain is inconclusive
        for its peers (which hop erred is unknown)."""
        evidence = next(r for r, v in zip(referees, on_checker) if v == "fail")
        view = compare_updates(record.inputs, evidence.output, checker.output)
        if len(checker.route) > 1:
            for receipt in checker.receipts:
                if receipt is not None:
                    self.node.attest(receipt, view, "inconclusive", profile.name)
            logger.info(f"Spot check: the chained checker route {' -> '.join(checker.peers)} disagreed with the "
                        f"referees on blocks {record.start}:{record.end}; no hop is blamed")
            return
        if checker.receipts[0] is None:
            return
        self.stats.checker_faults += 1
        self.node.attest(checker.receipts[0], view, "fail", profile.name)
        peer = checker.peers[0]
        self.stats.caught_after.setdefault(peer, self.stats.responses[peer])
        logger.warning(f"Spot check: checker {peer} is at fault on blocks {record.start}:{record.end} "
                       f"(contradicted by trusted referees)")

    def _corroborate(self, record: StepRecord, receipt: Receipt, checker: Execution, referees: list[Execution],
                     on_subject: list[str], on_checker: list[str], cold: bool, subject_passed: bool) -> None:
        """A referee that agrees with the checker route (or with the subject) and that side vouch for each other,
        where the other side is trusted (or at a cold start): agreement between independent executions is the
        only way newcomers earn trust, and agreement among untrusted newcomers earns nothing."""
        subject_config = (receipt.dtype, receipt.compression)
        sides = [(checker.receipts, checker.configs, checker.output, self._route_weight(checker.peers), on_checker),
                 ([] if subject_passed else [receipt], [subject_config], record.output,
                  self._weight(str(record.peer_id)), on_subject)]
        for receipts, configs, output, weight, votes in sides:
            for referee, vote in zip(referees, votes):
                profile = _routes_profile(configs, referee.configs)
                if vote != "pass" or profile is None:
                    continue
                agreement = compare_updates(record.inputs, referee.output, output)
                if weight >= ESTABLISHED or cold:
                    self._vouch(referee.receipts, agreement, profile)
                if self._route_weight(referee.peers) >= ESTABLISHED or cold:
                    self._vouch(receipts, agreement, profile)

    def _conclude(self, receipt: Receipt, agreement: Agreement, verdict: str, profile: ToleranceProfile,
                  checker_receipt: Receipt | None, record: StepRecord, effect: Effect | None = None,
                  by: str = "referees") -> str:
        if verdict == "pass":
            self.node.attest(receipt, agreement, verdict, profile.name)
            self.stats.passes += 1
            if checker_receipt is not None:  # the checker's work agreed too
                self.node.attest(checker_receipt, agreement, "pass", profile.name)
            return verdict
        # a fault: the subject's receipt, the agreement and the step itself (to re-run without the subject) as
        # evidence; not for a session with deep prompts, which evidence cannot carry (a re-run without them would
        # contradict an honest peer): that attestation travels as an accusation only
        changed = effect is not None and effect.verdict == "fail"
        name = f"{profile.name}+effect" if changed else profile.name
        evidence = None if record.prompts is not None else Evidence.of_step(record.history, record.inputs, record.output)
        self.node.attest(receipt, agreement, verdict, name[:64], evidence=evidence)
        self.stats.faults += 1
        subject = str(record.peer_id)
        self.stats.caught_after.setdefault(subject, self.stats.responses[subject])
        what = (f"the answer's next token changed from {effect.reference_token} to {effect.subject_token} where the "
                f"checker's top-1 led by {effect.lead:.2f} logits (clear above {effect.margin:.2f}); " if changed else "")
        logger.warning(
            f"Spot check: {subject} is at fault on blocks {record.start}:{record.end} ({what}"
            f"cosine {agreement.min_token_cosine:.3f}, relative L2 {agreement.rel_l2:.3f}, confirmed by {by})"
        )
        return verdict


def _routes_profile(a: list[Config], b: list[Config]) -> ToleranceProfile | None:
    """The tolerance for comparing two chains of configurations: the loosest of their pairs."""
    profiles = [route_profile(x, b) for x in a]
    if not profiles or any(p is None for p in profiles):
        return None
    return max(profiles, key=lambda p: (p.pass_max_rel_l2, p.fail_max_rel_l2))


def _receipt_matches(receipt: Receipt, signer: str, inputs: torch.Tensor, output: torch.Tensor,
                     prompts: torch.Tensor | None = None) -> bool:
    return (
        receipt.verify() is Check.OK
        and receipt.signer == signer
        and receipt.input_digest == inputs_digest(inputs, prompts)
        and receipt.output_digest == tensor_digest(output)
    )
