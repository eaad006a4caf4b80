//! Parser tests on outputs recorded from the real CLI (see fixtures/README.md).

use super::*;

