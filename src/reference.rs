pub struct Reference;
