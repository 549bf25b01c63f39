"""--plan: the trainer's own step compiled for this machine or a deviceless TPU / GPU target (planner, targets), with
the compiled program's collective bytes (collectives).
"""
