"""Build the embedded sample `halfcheetah-sample-v5.parquet` from the full datasets.

    python src/dtlab/assets/make_sample.py --data-dir ../shared/data

Takes the first MEDIUM (12) episodes of halfcheetah-medium-v5 and the first EXPERT (88) of
halfcheetah-expert-v5 (HalfCheetah-v5, gymnasium 1.4, mujoco 4.0, rolled out from RL Zoo agents:
ARS with action noise 0.1 for medium, TQC for expert; see README.md), in the schema of the hub
dataset edbeeching/decision_transformer_gym_replay, and writes them as one Parquet file.
"""

import argparse
from pathlib import Path

import datasets
import pyarrow.parquet as pq

# Until 0.2.0: 18 and 12; then 12 and 38. A DT trained on 12 expert episodes stood still or
# flipped in about half of its episodes asked for the expert's return; with 88 and
# data.start_share (model=cpu) in 1.7% (docs/notes.md#return-conditioning). 8 MB at most (issue 30).
MEDIUM, EXPERT = 12, 88
# Byte-stream-split floats and zstd: the same values and schema in ~2/3 of the bytes (100
# episodes in 7.7 MB)
FLOATS = ["observations.list.element.list.element", "actions.list.element.list.element", "rewards.list.element"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "halfcheetah-sample-v5.parquet")
    args = parser.parse_args()
    sources = {"halfcheetah-medium-v5.parquet": MEDIUM, "halfcheetah-expert-v5.parquet": EXPERT}
    parts = [datasets.Dataset.from_parquet(str(args.data_dir / name)).select(range(n)) for name, n in sources.items()]
    datasets.concatenate_datasets(parts).to_parquet(str(args.out))  # with the features' metadata
    table = pq.read_table(args.out)
    pq.write_table(
        table, args.out, compression="zstd", compression_level=19, use_byte_stream_split=FLOATS, use_dictionary=False
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
