"""DVC stage `maml`: MAML (Finn et al. 2017), a policy initialisation meta-trained with TRPO."""

from pipeline.maml.run import run_maml
from pipeline.stage import stage_main


def main(config, root):
    run_maml(
        config,
        tasks_path=root / "data/prepared/tasks.json",
        policy_path=root / "models/maml/policy.pt",
        pretrained_path=root / "models/maml/pretrained.pt",
        metrics_path=root / "metrics/maml.json",
        plots_dir=root / "plots/maml",
        checkpoint_dir=root / "checkpoints/maml",
    )


if __name__ == "__main__":
    stage_main("maml", main)
