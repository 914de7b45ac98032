"""What the tests share: tiny configs (tiny.py), training under any layout and comparing it with one
device (parity.py), save/resume jobs (checkpoint_steps.py), commands run with a deadline
(commands.py), small trained tokenizers of every kind (tokenizers.py), and the autograd nodes a
tensor came through (graph.py)."""
