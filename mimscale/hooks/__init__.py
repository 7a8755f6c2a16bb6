"""Loop hooks: what a method needs from the training loop besides its module (AMT's attention
store and refreshes, EMA copies). Each method's registry entry (mimscale/methods/) names its
hooks; methods without any get ``LoopHooks()``, which does nothing."""
