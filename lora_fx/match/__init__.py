"""Match: the linear forms as rules, the matcher (Site / Skip), target selection, PEFT's reach."""
