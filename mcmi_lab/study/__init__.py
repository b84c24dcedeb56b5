"""The study's bookkeeping: recipes (the paper's steps), dose-matched teachers, pipelines, run folders and the teacher report card."""
