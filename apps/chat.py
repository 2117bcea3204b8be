"""`swarm-chat`: talk to a model served by the swarm, token by token.

The conversation lives in one inference session: each turn sends only the tokens the peers have
not seen yet (the new user message and the template around it), never the whole history. An answer that
spot checks did not fully verify gets a one-line mark under it (`--strict` checks every step). With
`--prompt-lookup N`, each step also carries up to N tokens guessed from the text so far (speculative decoding):
the same answer in fewer round trips when it repeats what came before.
"""

from __future__ import annotations

from swarm.runtime import prefer_passive_openmp, quiet_libraries

prefer_passive_openmp()  # before torch is imported

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from apps.streaming import StreamedText
from swarm.config import STRICT
from swarm.errors import SwarmError
from swarm.models import DEFAULT_MODEL
from swarm.network import initial_peers_from, trusted_peers_from
from swarm.routing import usable_spans

logger = logging.getLogger(__name__)


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    started: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    round_trips: int | None = None  # steps through the swarm, when speculative decoding was on

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first, over the time they took."""
        if self.first_token_at is None or self.new_tokens < 2:
            return None
        return (self.new_tokens - 1) / max(self.last_token_at - self.first_token_at, 1e-9)

    def summary(self) -> str:
        ttft = self.time_to_first_token
        speed = self.tokens_per_second
        trips = "" if not self.round_trips else (
            f", {self.round_trips} round trips ({self.new_tokens / self.round_trips:.2f} tokens each)")
        return (
            f"{self.new_tokens} tokens, time to first token "
            f"{'-' if ttft is None else f'{ttft * 1000:.0f} ms'}, "
            f"{'-' if speed is None else f'{speed:.1f}'} tokens/s{trips}"
        )


class TerminalStreamer(StreamedText):
    """Prints the answer as its tokens arrive (transformers' streamer interface), and times them."""

    def __init__(self, tokenizer, stats: TurnStats, out=sys.stdout):
        super().__init__(tokenizer, on_text=self._print)
        self.stats, self.out = stats, out

    def put(self, value: torch.Tensor) -> None:
        if self._seen_prompt:  # the first call carries the prompt
            now = time.perf_counter()
            if self.stats.first_token_at is None:
                self.stats.first_token_at = now
            self.stats.last_token_at = now
            self.stats.new_tokens += value.numel()
        super().put(value)

    def rewind(self, kept_new_tokens: int) -> None:
        """The newest tokens were dropped (a peer that computed them was caught cheating): say so, then
        print the kept part again so the answer reads on from there."""
        super().rewind(kept_new_tokens)
        self.stats.new_tokens = len(self.tokens)
        self._print(f"\n[a peer on the route was caught returning wrong results; answering again]\n{self.sent}")

    def end(self) -> None:
        self._print("\n")

    def _print(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


@dataclass
class Conversation:
    """Messages so far and the token ids the session's peers already hold."""

    messages: list[dict] = field(default_factory=list)
    fed_ids: list[int] = field(default_factory=list)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatSession:
    def __init__(self, model, max_length: int, max_new_tokens: int, temperature: float, top_p: float,
                 prompt_lookup: int = 0):
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.prompt_lookup = prompt_lookup  # draft tokens per step (speculative decoding); 0: off
        self.session = model.inference_session(max_length)
        self.conversation = Conversation()
        self.last_stats: TurnStats | None = None
        self.last_report = None  # swarm.client.GenerationReport of the last answer

    def reset(self) -> None:
        self.session.close()
        self.session = self.model.inference_session(self.max_length)
        self.conversation = Conversation()

    def ask(self, text: str, out=sys.stdout) -> str:
        conv = self.conversation
        messages = conv.messages + [{"role": "user", "content": text}]
        full_ids = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        keep = common_prefix_length(conv.fed_ids, full_ids)
        new_ids = full_ids[keep:] or full_ids[-1:]
        keep = len(full_ids) - len(new_ids)
        if len(full_ids) + self.max_new_tokens > self.max_length:
            raise SwarmError(f"the conversation would exceed {self.max_length} tokens; /reset to start over")
        self.session.rollback(keep)
        stats = TurnStats(prompt_tokens=len(new_ids), started=time.perf_counter())
        streamer = TerminalStreamer(self.tokenizer, stats, out)
        result = self.model.generate(
            torch.tensor([new_ids]),
            max_new_tokens=self.max_new_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature if self.temperature > 0 else 1.0,
            top_p=self.top_p,
            streamer=streamer,
            session=self.session,
            return_dict_in_generate=True,
            prompt_lookup_num_tokens=self.prompt_lookup,
        )
        self.last_report = result.report
        if self.prompt_lookup:
            stats.round_trips = result.report.decoding.round_trips
        mark = result.report.mark()
        if mark is not None:  # not fully verified: say so under the answer (on stderr: stdout is only answers)
            click.echo(mark, err=True)
        generated = result.sequences[0, len(new_ids) :].tolist()
        conv.fed_ids = full_ids + generated[:-1]  # the last token was sampled but not yet sent
        answer = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
        conv.messages = messages + [{"role": "assistant", "content": answer}]
        self.last_stats = stats
        return answer

    def describe_route(self) -> str:
        rows = []
        for hop in self.session.route:
            latency = self.model.sequence.probe.rtt(hop.peer_id)
            rtt = "?" if latency is None else f"{latency * 1000:.1f} ms"
            rows.append(f"  blocks {hop.start}:{hop.end}  peer {hop.peer_id}  rtt {rtt}")
        return "\n".join(rows) if rows else "  (no route yet: ask something first)"

    def describe_trust(self) -> str:
        layer = self.model.trust_layer
        return "  (spot checks are off)" if layer is None else layer.describe()


def progress(message: str) -> None:
    """What swarm-chat is doing, on stderr (stdout carries only answers and command output)."""
    click.echo(message, err=True)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def connect(model) -> str:
    """Find a route over all the model's blocks (waiting for missing ones, as a first question would), and
    say who serves them. Raises MissingBlocksError if the swarm cannot serve the model."""
    sequence = model.sequence
    route = model.loop.run(sequence.make_route())
    reachable = {s.peer_id for s in usable_spans(sequence.spans, sequence.banned())
                 if sequence.probe.rtt(s.peer_id) is not None}
    return (f"Connected: {sequence.num_blocks} blocks served by {plural(len(reachable), 'peer')} "
            f"(route: {plural(len(route), 'hop')})")


def run_repl(chat: ChatSession) -> None:
    click.echo("Type a message; /route, /stats, /trust, /reset, /exit.", err=True)
    while True:
        try:
            text = input("\n>>> ").strip()
        except EOFError:
            break
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/route":
            click.echo(chat.describe_route())
        elif text == "/stats":
            click.echo(chat.last_stats.summary() if chat.last_stats else "no turn yet")
        elif text == "/trust":
            click.echo(chat.describe_trust())
        elif text == "/reset":
            chat.reset()
            click.echo("(conversation cleared)")
        elif text.startswith("/"):
            click.echo(f"unknown command {text}; try /route, /stats, /trust, /reset, /exit")
        else:
            try:
                chat.ask(text)
            except SwarmError as e:
                click.echo(f"error: {e}", err=True)


PROMPT_LOOKUP_HELP = (
    "Speculative decoding: each step also sends up to N tokens guessed by prompt lookup (what followed the last "
    "words where they occurred before) and keeps those the model confirms. The same answer, in fewer round trips "
    "when it repeats or quotes earlier text. A step with guesses costs the peers more compute (on 2 CPU cores about "
    "twice a one-token step), so it pays most on slow links and can be slower on fast ones. 0: off."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Alias, Hugging Face repo id or local path.")
@click.option("--initial-peers", multiple=True, help="Multiaddrs of peers in the swarm. Default: $SWARM_INITIAL_PEERS.")
@click.option("--prompt", help="Answer this one message and exit.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0: greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--max-length", default=2048, show_default=True, type=click.IntRange(min=2), help="Session length in tokens.")
@click.option("--trusted-peers", multiple=True, help="Peer ids of pre-trusted seeds. Default: $SWARM_TRUSTED_PEERS.")
@click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), help="Key file this client signs its spot-check verdicts with.")
@click.option("--no-spot-checks", is_flag=True, help="Do not re-run a sample of steps on other peers.")
@click.option("--strict", is_flag=True, help="Check every step of every answer, and wait for the checks before answering.")
@click.option("--self-verify-gb", default=0.0, show_default=True, type=click.FloatRange(min=0), help="Memory (GiB) for blocks this client loads itself to check hops that no other peer serves (0: none).")
@click.option("--prompts", "prompts_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), help="Trained prompts (soft, and deep ones if tuned with --tuning deep_prompt) for every conversation (a directory written by swarm-tune).")
@click.option("--prompt-lookup", default=0, show_default=True, type=click.IntRange(min=0), help=PROMPT_LOOKUP_HELP)
@click.option("--push/--no-push", default=True, show_default=True, help="Decode steps go to every peer of the route at once, and each peer passes its output on to the next (fewer round trips on slow links).")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.pass_context
def main(ctx, model, initial_peers, prompt, max_new_tokens, temperature, top_p, max_length, trusted_peers, identity,
         no_spot_checks, strict, self_verify_gb, prompts_dir, prompt_lookup, push, verbose) -> None:
    """Chat with a model whose blocks are served by the swarm (`swarm-chat serve`: an OpenAI-compatible API)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries(verbose)
    if ctx.invoked_subcommand is not None:
        return
    if strict and no_spot_checks:
        raise click.UsageError("--strict checks every step; it cannot go with --no-spot-checks")
    from reputation.client import ClientTrust
    from swarm.client import DistributedModelForCausalLM

    model_handle = None
    try:
        peers = initial_peers_from(initial_peers)
        progress(f"Loading {model} (tokenizer, embeddings, head) and joining the swarm " + (
            f"through {plural(len(peers), 'initial peer')}..." if peers else
            "with no initial peers (see --initial-peers)..."))
        model_handle = DistributedModelForCausalLM.from_pretrained(
            model, peers, spot_checks=not no_spot_checks, **(STRICT if strict else {}),
            trusted_peers=trusted_peers_from(trusted_peers), identity=identity, trust_layer=ClientTrust,
            self_verify_bytes=int(self_verify_gb * 2**30), prompts=prompts_dir, push=push,
        )
        progress(f"Looking for peers serving its {model_handle.sequence.num_blocks} blocks...")
        progress(connect(model_handle))
        chat = ChatSession(model_handle, max_length, max_new_tokens, temperature, top_p, prompt_lookup)
        if prompt is not None:
            chat.ask(prompt)
            route = " -> ".join(f"{h.peer_id}[{h.start}:{h.end}]" for h in chat.session.route)
            click.echo(f"route: {route}\n{chat.last_stats.summary()}", err=True)
        else:
            run_repl(chat)
        chat.session.close()
    except SwarmError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if model_handle is not None:
            model_handle.shutdown()


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Alias, repo id or path; clients ask for this name.")
@click.option("--initial-peers", multiple=True, help="Multiaddrs of peers in the swarm. Default: $SWARM_INITIAL_PEERS.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--max-length", default=2048, show_default=True, type=click.IntRange(min=2), help="Prompt + new tokens per request.")
@click.option("--default-max-tokens", default=256, show_default=True, type=click.IntRange(min=1), help="New tokens when a chat request sets no max_tokens.")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=1), help="Requests generated at once.")
@click.option("--strict", is_flag=True, help="Check every step of every answer, and wait for the checks (streamed answers too).")
@click.option("--self-verify-gb", default=0.0, show_default=True, type=click.FloatRange(min=0), help="Memory (GiB) for blocks this client loads itself to check hops that no other peer serves (0: none).")
@click.option("--prompts", "prompts_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), help="Trained prompts (soft, and deep ones if tuned with --tuning deep_prompt) for every conversation (a directory written by swarm-tune).")
@click.option("--prompt-lookup", default=0, show_default=True, type=click.IntRange(min=0), help=PROMPT_LOOKUP_HELP)
def serve(model, initial_peers, host, port, max_length, default_max_tokens, workers, strict, self_verify_gb,
          prompts_dir, prompt_lookup) -> None:
    """Serve /v1/models, /v1/chat/completions and /v1/completions (OpenAI's API) backed by the swarm."""
    from apps.api.serve import ServeConfig, serve as run_server

    logging.getLogger("apps.api").setLevel(logging.INFO)
    try:
        cfg = ServeConfig(model=model, initial_peers=tuple(initial_peers_from(initial_peers)), host=host, port=port,
                          max_length=max_length, default_max_tokens=default_max_tokens, workers=workers,
                          strict=strict, self_verify_bytes=int(self_verify_gb * 2**30), prompts=prompts_dir,
                          prompt_lookup=prompt_lookup)
        run_server(cfg)
    except SwarmError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
