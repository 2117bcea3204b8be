"""Making a peer's share cheaper: SVD low-rank blocks (plain or activation-aware) and bitsandbytes int8 / nf4."""

from peers.compression.options import SvdSpec, check_options, compression_tag, svd_spec

__all__ = ["SvdSpec", "check_options", "compression_tag", "svd_spec"]
