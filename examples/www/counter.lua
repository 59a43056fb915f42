-- Globals persist across the requests one state serves.
count = 0
function handler(r)
  count = count + 1
  r:content_type("text/plain")
  return "this state has served " .. count .. " requests\n"
end
