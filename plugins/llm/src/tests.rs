//! Parser tests on outputs recorded from the real CLI (see fixtures/README.md), and the
//! command line built for a request.

use super::*;

exechost_plugin_sdk::plugin_tests!(Llm, "llm");
