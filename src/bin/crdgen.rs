//! Prints the CustomResourceDefinitions generated from the Rust types, as YAML.
//! `make crds` writes its output to `crds/`; `make test` regenerates it and fails on drift.

fn main() {
    print!("{}", xero_operator::crd::definition_yaml());
}
