// Build script of the crates that link libtorch through arcana (see libtorch.rs).
mod libtorch;

fn main() {
    libtorch::link();
}
