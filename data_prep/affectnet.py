r"""`python -m data_prep.affectnet`: the documented entry point, kept.

The driver prepares every dataset (AffectNet in any layout, FER2013,
FERPlus, RAF-DB, class-folder trees), so it lives in `data_prep.prepare`;
this module re-exports it, and `python -m data_prep.prepare` is the same
program. See `data_prep.prepare` for the flags and the output.
"""
from absl import flags

from data_prep import prepare as _driver
from data_prep.prepare import *  # pylint: disable=wildcard-import,unused-wildcard-import

if __name__ == "__main__":
  __doc__ = _driver.__doc__  # What --help prints above the flags.
  _driver.define_flags()
  flags.adopt_module_key_flags(_driver)  # --help lists the driver's flags.
  _driver.run_app()
