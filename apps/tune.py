"""`swarm-tune`: train prompts through the swarm on chat examples, report held-out accuracy, save the prompts."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from tqdm import tqdm

from apps.chat import progress
from swarm.network import initial_peers_from
from swarm.runtime import quiet_libraries
from swarm.errors import SwarmError
from swarm.models import DEFAULT_MODEL


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Alias, Hugging Face repo id or local path.")
@click.option("--initial-peers", multiple=True, help="Multiaddrs of peers in the swarm. Default: $SWARM_INITIAL_PEERS.")
@click.option("--data", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="JSONL of chat examples. Default: the shipped product reviews (swarm/data/reviews.jsonl).")
@click.option("--tuning", type=click.Choice(["prompt", "deep_prompt"]), default="prompt", show_default=True,
              help="prompt: soft prompts before the input; deep_prompt: also one prompt per block (chat uses both).")
@click.option("--prompt-length", default=16, show_default=True, type=click.IntRange(1, 512))
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--micro-batches", default=1, show_default=True, type=click.IntRange(min=1),
              help="Send each batch through the peers in this many parts at once, so the peers work in a pipeline.")
@click.option("--lr", default=0.01, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Adam's learning rate.")
@click.option("--held-out", default=0.2, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of the examples kept out of training, to measure accuracy on.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("prompts"), show_default=True,
              help="Directory to write the trained prompts to (swarm-chat --prompts reads it).")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(model, initial_peers, data, tuning, prompt_length, epochs, batch_size, micro_batches, lr, held_out, seed, output,
         verbose) -> None:
    """Train prompts through the swarm: the peers run the frozen blocks forward and backward; token ids, labels
    and the loss stay here."""
    from swarm.client import DistributedModelForCausalLM
    from swarm.finetune import DEFAULT_DATA, accuracy, load_examples, split, train

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries(verbose)
    handle = None
    try:
        examples = load_examples(data or DEFAULT_DATA)
        training, evaluation = split(examples, held_out, seed)
        peers = initial_peers_from(initial_peers)
        progress(f"Loading {model} and joining the swarm...")
        handle = DistributedModelForCausalLM.from_pretrained(model, peers, tuning=tuning, prompt_length=prompt_length,
                                                             spot_checks=False, train_micro_batches=micro_batches)
        before = accuracy(handle, evaluation)
        click.echo(f"held-out accuracy before tuning: {before:.1%} ({len(evaluation)} examples)")
        steps = epochs * -(-len(training) // batch_size)
        with tqdm(total=steps, desc="tuning", unit="step") as bar:
            def on_step(step: int, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                logging.getLogger("swarm-tune").info(f"step {step}: loss {loss:.4f}")

            log = train(handle, training, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, on_step=on_step)
        click.echo(f"loss: first step {log.losses[0]:.3f}, last step {log.losses[-1]:.3f} ({len(log.losses)} steps)")
        after = accuracy(handle, evaluation)
        click.echo(f"held-out accuracy after tuning: {after:.1%} ({len(evaluation)} examples)")
        saved = handle.save_prompts(output)
        click.echo(f"prompts written to {saved} (swarm-chat --prompts {saved})")
    except SwarmError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if handle is not None:
            handle.shutdown()


if __name__ == "__main__":
    main()
