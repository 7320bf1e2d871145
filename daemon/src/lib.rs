//! What every long-running Clickgate process (gateway, shipper, aggregator)
//! shares at its edge, and nothing of what it does:
//!
//! - [`logging`]: how a process writes its log: text for people (colour only
//!   on a terminal), or one JSON object per line for log shippers.
//! - [`faults`]: the test hooks (named crash points, an injected failing
//!   write, a clock that is off). They exist only with the
//!   `fault-injection` feature; without it each is an empty inline function
//!   and the binary holds none of their names.

pub mod faults;
pub mod logging;
