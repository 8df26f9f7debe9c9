"""What trains: the selector language and the plan it compiles to (per tensor: trainable,
frozen, or a sub-tensor mask), the plan in words (`pfreeze plan`), the enforcement that keeps
frozen elements bit-identical (gradient masks, restore after each step, the integrity audit),
and the SNR and gradient rankings behind the data-driven arms. Reads models only.

Called, `pfreeze.plan(model, select)` returns the plan table as a pandas DataFrame
(pfreeze.api.plan)."""
