"""The simulator: every node of a topology in one process, on trio's MockClock.

:mod:`p2pfed.sim.simulator` is the entry point (``simulate``, ``SimConfig``, ``Simulation``,
``plot_report``).  Nothing is imported here, so that reading a topology
(:mod:`p2pfed.sim.topology`) does not load torch.
"""
