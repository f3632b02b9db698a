"""Short sentences of everyday English the serving benchmarks send: one per concurrent client or request, so the
figures of bench/serve.py and bench/cluster.py are measured on the same inputs."""

SHORT_TEXTS = [
    "The capital of France is Paris.",
    "Dogs are loyal and friendly animals.",
    "Water boils at one hundred degrees.",
    "She plays the violin every evening.",
    "The stock market fell sharply today.",
    "Photosynthesis turns light into sugar.",
    "He forgot his umbrella on the train.",
    "Mount Everest is the highest mountain.",
    "The recipe needs two cups of flour.",
    "Our team won the final match easily.",
    "Bees communicate by dancing in the hive.",
    "The library opens at nine tomorrow.",
]
