//! Native tests of the filter against a mocked host (see filter.rs).
