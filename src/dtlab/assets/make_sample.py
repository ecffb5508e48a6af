"""Build the embedded sample `halfcheetah-sample-v5.parquet` from the full datasets.

    python src/dtlab/assets/make_sample.py --data-dir ../shared/data

Takes the first 18 episodes of halfcheetah-medium-v5 and the first 12 of halfcheetah-expert-v5
(HalfCheetah-v5, gymnasium 1.4, mujoco 4.0, rolled out from RL Zoo agents: ARS with action
noise 0.1 for medium, TQC for expert; see README.md), in the schema of the hub dataset
edbeeching/decision_transformer_gym_replay, and writes them as one Parquet file.
"""

import argparse
from pathlib import Path

import datasets

SOURCES = {"halfcheetah-medium-v5.parquet": 18, "halfcheetah-expert-v5.parquet": 12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "halfcheetah-sample-v5.parquet")
    args = parser.parse_args()
    parts = [datasets.Dataset.from_parquet(str(args.data_dir / name)).select(range(n)) for name, n in SOURCES.items()]
    datasets.concatenate_datasets(parts).to_parquet(str(args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
