"""Interactive explorers: the teacher explorer, the results explorer and their widgets."""
