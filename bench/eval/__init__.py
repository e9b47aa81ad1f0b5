"""``jupybox eval``: the Qwen-Agent code-interpreter benchmark, reproduced on the jupybox sandbox.

Generation follows the reference protocol (Qwen ReAct prompt, at most 1 execution per record, 3 for
visualization, stop after an error); executability is measured by re-running the extracted code in a
fresh sandbox session with the reference's preamble; GSM8K accuracy compares the last number of the
completion; visualization accuracy asks an OpenAI-compatible vision model to judge the produced image.
Every line of model code runs in the sandbox, never on the host.

Modules: ``data`` (inputs and the results file), ``generate`` (the ReAct protocol), ``execute``
(code extraction and executability), ``scoring`` (GSM8K numbers, the judge, metrics), ``report``
(Markdown table and bar chart), ``runner`` (workers, progress, resume, the CLI command).
"""

from .runner import EvalSettings, add_eval_flags, run_eval, run_eval_command

__all__ = ["EvalSettings", "add_eval_flags", "run_eval", "run_eval_command"]
