"""Outputs: the run directory and its rule that no file is ever half-written, checkpoint
files, the plots and the HTML/Markdown report (rendered from the files alone, so a report can
be redrawn or compared later), and the statistics across repeats. They take what they write
explicitly: nothing here imports the run."""
