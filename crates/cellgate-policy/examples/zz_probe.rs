// temporary probe (removed before handing back)
use cellgate_api::policy::InputDoc;
use cellgate_policy::PolicySet;
use std::path::PathBuf;
fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap());
    let set = PolicySet::load(&dir, &[]).expect("load");
    let s = std::fs::read_to_string(std::env::args().nth(2).unwrap()).unwrap();
    for line in s.lines().filter(|l| !l.trim().is_empty()) {
        let input: InputDoc = serde_json::from_str(line).unwrap();
        println!("{:?}", set.evaluate(&input));
    }
}
