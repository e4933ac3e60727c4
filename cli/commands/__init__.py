"""The commands: one module each, imported only when argv names it.

Each module's ``register(parser, argv)`` declares the command's arguments and
sets ``run``, the handler, which imports the implementation when it runs.
"""

# name -> (module, one-line help), in the order ``arbiter --help`` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny-models": ("cli.commands.make_tiny_models", "write tiny policy and reward models (HF directories)"),
    "serve": ("cli.commands.serve", "run a model service"),
    "score": ("cli.commands.score", "score JSON lines from stdin: {prompt, response} or {messages}"),
    "broker": ("cli.commands.broker", "run a local Kafka-protocol broker (Tansu, in memory) for dev and demos"),
    "drift": ("cli.commands.drift", "reward drift tools"),
    "triton": ("cli.commands.triton", "NVIDIA Triton Inference Server: export models, run one locally"),
    "train": ("cli.commands.train", "training jobs"),
    "rm": ("cli.commands.rm", "reward-model versions: list the registry, shadow-compare and promote"),
    "elo": ("cli.commands.elo", "Elo ratings of policy versions (reward-model or human judged), with CIs"),
    "worker": ("cli.commands.worker", "rollout worker: prompts -> policy, reward, reference -> rollouts topic"),
    "up": ("cli.commands.up", "run the whole loop (broker, services, worker, trainer) until Ctrl-C"),
    "demo": ("cli.commands.demo", "the end-to-end demo (what `make demo` runs)"),
}
