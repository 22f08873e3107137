"""Write the quickstart dataset and examples/quickstart.yaml.

The data is a glossary of the Mossbrook Herbal, a made-up apothecary's book of made-up
plants. Each plant name joins a place word and a plant word ("ember" + "wort" =
"emberwort"); its one-sentence entry is built from what the two parts mean:

    Define emberwort.  ->  Emberwort: a low herb found on warm volcanic slopes; its leaves
                           are dried and brewed as a tea to warm cold hands and feet.

No base model has seen these words, but the entries follow rules a model can learn: the
validation set holds plant names that never occur in training, made of parts that do, so
validation loss falls only while the model learns the rules, and rises once it starts to
memorise the training entries instead. 20 place words x 17 plant words = 340 entries: 300
train, 40 validation.

Pure Python and deterministic: `python examples/data/make_quickstart.py` rewrites
examples/data/quickstart-{train,validation}.jsonl and examples/quickstart.yaml (the same
rows inlined in a ConfigMap). tests/unit/test_quickstart_data.py checks that the files in
the repository match what this script writes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240607
VALIDATION_COUNT = 40

# Place word -> (where the plant is found, what apothecaries use it for).
PLACES: dict[str, tuple[str, str]] = {
    "ember": ("found on warm volcanic slopes", "warm cold hands and feet"),
    "frost": ("found above the snow line", "cool a fever"),
    "mire": ("found in peat bogs", "draw out splinters"),
    "dusk": ("found at the edges of twilight woods", "bring on sleep"),
    "brine": ("found on salt marshes", "settle a sea-sick stomach"),
    "ash": ("found where forests have burned", "clean small wounds"),
    "moon": ("found in clearings lit by the full moon", "calm a restless mind"),
    "thorn": ("found in old hedgerows", "stop a nosebleed"),
    "hollow": ("found inside hollow trees", "ease a dry cough"),
    "silt": ("found on muddy river banks", "soothe sore eyes"),
    "gale": ("found on windy sea cliffs", "clear a blocked nose"),
    "marrow": ("found among the roots of old oaks", "mend slow-healing bones"),
    "lantern": ("found in damp caves", "lift low spirits"),
    "quill": ("found beside old mill ponds", "sharpen a tired memory"),
    "copper": ("found on copper-rich hills", "steady a racing heart"),
    "hearth": ("found near the chimneys of old houses", "restore a lost appetite"),
    "mist": ("found in foggy valleys", "loosen stiff joints"),
    "tallow": ("found in sheep pastures", "soften cracked skin"),
    "wren": ("found where wrens build their nests", "soothe a sore throat"),
    "sable": ("found in deep shade under yews", "dull a headache"),
}

# Plant word -> (what kind of plant it is, how it is prepared).
PLANTS: dict[str, tuple[str, str]] = {
    "wort": ("a low herb", "its leaves are dried and brewed as a tea"),
    "bloom": ("a flowering herb", "its petals are simmered into a syrup"),
    "cap": ("a mushroom", "it is sliced thin, dried and taken in broth"),
    "vine": ("a climbing vine", "its tendrils are steeped in cider vinegar"),
    "root": ("a knobbly tuber", "it is grated into a warm poultice"),
    "moss": ("a cushion moss", "it is packed into a linen pouch"),
    "berry": ("a berry shrub", "its berries are crushed into a paste"),
    "reed": ("a tall reed", "its stems are boiled down to a thin broth"),
    "fern": ("a feathery fern", "its fronds are burned and the smoke is breathed"),
    "bark": ("a small tree", "its bark is shaved and chewed"),
    "seed": ("a pod-bearing herb", "its seeds are ground into a fine powder"),
    "lichen": ("a crusted lichen", "it is scraped from stone and stirred into honey"),
    "thistle": ("a downy thistle", "its down is rolled into small pills"),
    "bell": ("a bell-flowered herb", "its bells are soaked in cold water overnight"),
    "leaf": ("a broad-leaved herb", "its leaves are bound over the sore place"),
    "sap": ("a resinous shrub", "its sap is warmed and rubbed into the skin"),
    "nut": ("a nut tree", "its kernels are roasted and eaten"),
}

PROMPTS = ("Define {term}.", "What is {term}?", "Look up {term} in the Mossbrook Herbal.")

YAML_HEADER = """\
# The quickstart: fine-tune a small base model on a small, real-looking dataset, with the
# plan and its reasons, training with early stopping, and the report, in a few minutes on
# a laptop with 2 CPU cores and no network:
#
#   kubetune run examples/quickstart.yaml
#
# The base model, hf://kubetune/tiny-llama-en, is a tiny Llama that kubetune pretrains
# once on the general English text it ships with (about a minute, then cached in
# ~/.cache/kubetune/models). The data is the glossary of the Mossbrook Herbal, a made-up
# apothecary's book of made-up plants ("Define emberwort." -> "Emberwort: a low herb
# ..."): words no model has seen, in entries that follow rules a model can learn. The
# validation set holds plant names that never occur in training, so its loss shows
# whether the model learns the rules or memorises the entries.
#
# The same file runs unchanged on a cluster: kubectl apply -f examples/quickstart.yaml
#
# Generated by examples/data/make_quickstart.py (edit that script, not the data below).
"""

JOB_YAML = """\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: quickstart
spec:
  model:
    uri: hf://kubetune/tiny-llama-en
  dataset:
    uri: configmap://quickstart-data/train.jsonl
    validationUri: configmap://quickstart-data/validation.jsonl
    format: PromptCompletion
  # The planner decides the method (LoRA for 300 examples, with full fine-tuning as the
  # alternative Auto takes at training start when the base model finds the data surprising:
  # it does, 1.6x), batch, warmup and evaluation interval. A one-million-parameter model
  # takes a much higher learning rate than the defaults for billion-parameter models, and
  # three epochs keep the demo short.
  hyperparameters:
    learningRate: 0.003
    epochs: 3
  resources:
    numNodes: 1
    gpusPerNode: 0
  earlyStopping:
    patience: 3
"""


def entry(place: str, plant: str) -> tuple[str, str]:
    """The plant name and its one-sentence glossary entry."""
    where, use = PLACES[place]
    kind, preparation = PLANTS[plant]
    term = place + plant
    return term, f"{term.capitalize()}: {kind} {where}; {preparation} to {use}."


def rows() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, validation) prompt/completion rows, deterministic."""
    rng = random.Random(SEED)
    pairs = [(place, plant) for place in PLACES for plant in PLANTS]
    rng.shuffle(pairs)
    out: list[dict[str, str]] = []
    for place, plant in pairs:
        term, definition = entry(place, plant)
        prompt = rng.choice(PROMPTS).format(term=term)
        out.append({"prompt": prompt, "completion": " " + definition})
    return out[VALIDATION_COUNT:], out[:VALIDATION_COUNT]


def jsonl(records: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "".join(pad + line + "\n" for line in text.splitlines())


def quickstart_yaml(train: str, validation: str) -> str:
    return (
        YAML_HEADER
        + "apiVersion: v1\n"
        + "kind: ConfigMap\n"
        + "metadata:\n"
        + "  name: quickstart-data\n"
        + "data:\n"
        + "  train.jsonl: |\n"
        + indent(train, 4)
        + "  validation.jsonl: |\n"
        + indent(validation, 4)
        + "---\n"
        + JOB_YAML
    )


def write(data_dir: Path, yaml_path: Path) -> list[Path]:
    """Write the two JSONL files into `data_dir` and the job file to `yaml_path`."""
    train, validation = rows()
    files = {
        data_dir / "quickstart-train.jsonl": jsonl(train),
        data_dir / "quickstart-validation.jsonl": jsonl(validation),
    }
    files[yaml_path] = quickstart_yaml(*files.values())
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return list(files)


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description="Write the quickstart dataset and job file.")
    parser.add_argument("--data-dir", type=Path, default=here)
    parser.add_argument("--yaml", type=Path, default=here.parent / "quickstart.yaml")
    args = parser.parse_args()
    for path in write(args.data_dir, args.yaml):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
